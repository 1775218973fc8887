// Metal evaluation of every primitive: build the plan on the host, then
// encode it (metal/dispatch.cpp).
//
// NOT BUILT OR RUN IN THIS PROJECT'S CI: Linux cannot compile Metal. This
// file is compiled with BLOCKPOOL_METAL only when the configure-time check
// in CMakeLists.txt compiled the kernels and this host code; otherwise
// eval_gpu raises and blockpool.ops routes GPU streams to the reference.
#include <stdexcept>
#include <string>

#include "primitives.h"

#ifdef BLOCKPOOL_METAL

#include "metal/dispatch.h"
#include "mlx/allocator.h"
#include "plans.h"

namespace blockpool {

namespace {

// Host-known ids only: the op functions refuse traced ids on GPU streams,
// because a Metal kernel cannot raise before it writes.
std::vector<IdSpan> host_ids(const std::vector<BlockEntry>& entries,
                             const std::vector<int32_t>& host,
                             const char* op) {
  for (const auto& e : entries) {
    if (e.ids >= 0) {
      throw std::runtime_error(std::string(op) +
                               ": traced block ids cannot run on the GPU.");
    }
  }
  return id_spans(entries, host, {});
}

void allocate(std::vector<mx::array>& outputs) {
  for (auto& out : outputs) {
    out.set_data(mx::allocator::malloc(out.nbytes()));
  }
}

}  // namespace

void GatherBlocks::eval_gpu(const std::vector<mx::array>& inputs,
                            std::vector<mx::array>& outputs) {
  allocate(outputs);
  auto slots = layouts_of(inputs, outputs);
  auto ids = host_ids(params_.entries, params_.host_ids, "gather_blocks");
  auto plan = plan_gather(slots, static_cast<int>(inputs.size()), params_.entries, ids);
  metal::encode_copy_plan(stream(), plan, inputs, outputs);
}

void ScatterBlocks::eval_gpu(const std::vector<mx::array>& inputs,
                             mx::array& out) {
  const auto& in = inputs[0];
  bool donated = adopt_or_allocate(&in, out);
  std::vector<mx::array> outputs{out};
  auto slots = layouts_of(inputs, outputs);
  auto ids = host_ids(params_.entries, params_.host_ids, "scatter_blocks");
  // Checked here, on the host, before anything is encoded.
  auto plan = plan_scatter(slots, static_cast<int>(inputs.size()), params_.entries,
                           ids, donated);
  metal::encode_copy_plan(stream(), plan, inputs, outputs);
}

void GatherDequantizeBlocks::eval_gpu(const std::vector<mx::array>& inputs,
                                      std::vector<mx::array>& outputs) {
  allocate(outputs);
  auto slots = layouts_of(inputs, outputs);
  auto ids = host_ids(params_.entries, params_.host_ids, "gather_dequantize_blocks");
  auto plan = plan_gather_dequantize(slots, static_cast<int>(inputs.size()),
                                     params_.entries, ids, params_.group_size, params_.bits);
  metal::encode_dequant_plan(stream(), plan, inputs, outputs, params_.group_size,
                             params_.bits);
}

void ConcatBlocks::eval_gpu(const std::vector<mx::array>& inputs,
                            std::vector<mx::array>& outputs) {
  allocate(outputs);
  auto slots = layouts_of(inputs, outputs);
  auto plan = plan_concat(slots, static_cast<int>(inputs.size()), params_.entries,
                          params_.block_inputs);
  metal::encode_copy_plan(stream(), plan, inputs, outputs);
}

void ConcatDequantizeBlocks::eval_gpu(const std::vector<mx::array>& inputs,
                                      std::vector<mx::array>& outputs) {
  allocate(outputs);
  auto slots = layouts_of(inputs, outputs);
  auto plan = plan_concat_dequantize(slots, static_cast<int>(inputs.size()),
                                     params_.entries, params_.block_inputs, params_.group_size,
                                     params_.bits);
  metal::encode_dequant_plan(stream(), plan, inputs, outputs, params_.group_size,
                             params_.bits);
}

void SplitBlocks::eval_gpu(const std::vector<mx::array>& inputs,
                           std::vector<mx::array>& outputs) {
  allocate(outputs);
  auto slots = layouts_of(inputs, outputs);
  auto plan = plan_split(slots, static_cast<int>(inputs.size()), params_.entries,
                         params_.block_tokens);
  metal::encode_copy_plan(stream(), plan, inputs, outputs);
}

}  // namespace blockpool

#else  // no Metal kernels in this build

namespace blockpool {

namespace {

[[noreturn]] void no_gpu_kernel(const char* op) {
  throw std::runtime_error(
      std::string(op) +
      ": this build has no GPU kernel; blockpool.ops uses the pure-MLX "
      "reference on GPU streams (see blockpool.ops.backend).");
}

}  // namespace

void GatherBlocks::eval_gpu(const std::vector<mx::array>&,
                            std::vector<mx::array>&) {
  no_gpu_kernel("gather_blocks");
}

void GatherDequantizeBlocks::eval_gpu(const std::vector<mx::array>&,
                                      std::vector<mx::array>&) {
  no_gpu_kernel("gather_dequantize_blocks");
}

void ScatterBlocks::eval_gpu(const std::vector<mx::array>&, mx::array&) {
  no_gpu_kernel("scatter_blocks");
}

void ConcatBlocks::eval_gpu(const std::vector<mx::array>&,
                            std::vector<mx::array>&) {
  no_gpu_kernel("concat_blocks");
}

void ConcatDequantizeBlocks::eval_gpu(const std::vector<mx::array>&,
                                      std::vector<mx::array>&) {
  no_gpu_kernel("concat_dequantize_blocks");
}

void SplitBlocks::eval_gpu(const std::vector<mx::array>&,
                           std::vector<mx::array>&) {
  no_gpu_kernel("split_blocks");
}

}  // namespace blockpool

#endif
