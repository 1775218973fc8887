// Metal evaluation of GatherBlocks and ScatterBlocks.
//
// NOT BUILT OR RUN IN THIS PROJECT'S CI: Linux cannot compile Metal. This
// file follows MLX's extension example and is compiled only when MLX was
// built with Metal (BLOCKPOOL_METAL, set from MLX_BUILD_METAL). Without it,
// eval_gpu raises, and blockpool.ops routes GPU streams to the pure-MLX
// reference instead.
#include <stdexcept>

#include "block_ops.h"

#ifdef BLOCKPOOL_METAL

#include <dlfcn.h>

#include <filesystem>

#include "mlx/backend/metal/device.h"
#include "mlx/backend/metal/utils.h"

namespace blockpool {

namespace {

// blockpool.metallib is installed next to the extension module.
std::string extension_dir() {
  Dl_info info;
  if (dladdr(reinterpret_cast<const void*>(&extension_dir), &info) == 0 ||
      info.dli_fname == nullptr) {
    throw std::runtime_error("blockpool: cannot locate the extension binary.");
  }
  return std::filesystem::path(info.dli_fname).parent_path().string();
}

MTL::ComputePipelineState* kernel(mx::metal::Device& d, const char* base,
                                  const mx::array& a) {
  auto* lib = d.get_library("blockpool", extension_dir());
  return d.get_kernel(std::string(base) + "_" + std::to_string(a.itemsize()),
                      lib);
}

std::vector<int64_t> strides_of(const mx::array& a) {
  return {a.strides().begin(), a.strides().end()};
}

}  // namespace

void GatherBlocks::eval_gpu(const std::vector<mx::array>& inputs,
                            std::vector<mx::array>& outputs) {
  auto& s = stream();
  auto& d = mx::metal::device(s.device);
  auto& enc = mx::metal::get_command_encoder(s);
  int num_pools = static_cast<int>(inputs.size()) - 1;
  const auto& ids = inputs[num_pools];

  for (size_t i = 0; i < entries_.size(); ++i) {
    const auto& e = entries_[i];
    const auto& pool = inputs[e.pool];
    auto& out = outputs[i];
    out.set_data(mx::allocator::malloc(out.nbytes()));
    if (out.size() == 0) {
      continue;
    }
    int ids_start = e.ids_start, num_ids = e.num_ids;
    int num_blocks = pool.shape(0), block = pool.shape(2), dim = pool.shape(3);
    auto* k = kernel(d, "gather_blocks", pool);
    enc.set_compute_pipeline_state(k);
    enc.set_input_array(pool, 0);
    enc.set_input_array(ids, 1);
    enc.set_output_array(out, 2);
    enc.set_vector_bytes(strides_of(pool), 3);
    enc.set_bytes(ids_start, 4);
    enc.set_bytes(num_ids, 5);
    enc.set_bytes(num_blocks, 6);
    enc.set_bytes(block, 7);
    enc.set_bytes(dim, 8);
    MTL::Size grid(block * dim, num_ids, pool.shape(1));
    MTL::Size group(std::min<size_t>(block * dim,
                                     k->maxTotalThreadsPerThreadgroup()),
                    1, 1);
    enc.dispatch_threads(grid, group);
  }
}

void GatherDequantizeBlocks::eval_gpu(const std::vector<mx::array>& inputs,
                                      std::vector<mx::array>& outputs) {
  auto& s = stream();
  auto& d = mx::metal::device(s.device);
  auto& enc = mx::metal::get_command_encoder(s);
  int n = (static_cast<int>(inputs.size()) - 1) / 3;
  const auto& ids = inputs[3 * n];
  for (size_t i = 0; i < entries_.size(); ++i) {
    const auto& e = entries_[i];
    const auto& packed = inputs[e.pool];
    const auto& scales = inputs[n + e.pool];
    const auto& biases = inputs[2 * n + e.pool];
    auto& out = outputs[i];
    out.set_data(mx::allocator::malloc(out.nbytes()));
    if (out.size() == 0) {
      continue;
    }
    int ids_start = e.ids_start, num_ids = e.num_ids;
    int num_blocks = packed.shape(0), block = packed.shape(2);
    int dim = out.shape(3), group_size = group_size_, bits = bits_;
    auto* lib = d.get_library("blockpool", extension_dir());
    auto* k = d.get_kernel("gather_dequantize_" + mx::type_to_name(out), lib);
    enc.set_compute_pipeline_state(k);
    enc.set_input_array(packed, 0);
    enc.set_input_array(scales, 1);
    enc.set_input_array(biases, 2);
    enc.set_input_array(ids, 3);
    enc.set_output_array(out, 4);
    enc.set_vector_bytes(strides_of(packed), 5);
    enc.set_vector_bytes(strides_of(scales), 6);
    enc.set_bytes(ids_start, 7);
    enc.set_bytes(num_ids, 8);
    enc.set_bytes(num_blocks, 9);
    enc.set_bytes(block, 10);
    enc.set_bytes(dim, 11);
    enc.set_bytes(group_size, 12);
    enc.set_bytes(bits, 13);
    MTL::Size grid(block * dim, num_ids, packed.shape(1));
    MTL::Size group(std::min<size_t>(block * dim, k->maxTotalThreadsPerThreadgroup()), 1, 1);
    enc.dispatch_threads(grid, group);
  }
}

void ScatterBlocks::eval_gpu(const std::vector<mx::array>& inputs,
                             mx::array& out) {
  auto& s = stream();
  auto& d = mx::metal::device(s.device);
  auto& enc = mx::metal::get_command_encoder(s);
  const auto& in = inputs[0];
  const auto& ids = inputs[1];

  if (in.is_donatable() && in.flags().row_contiguous &&
      in.data_size() == in.size()) {
    out.copy_shared_buffer(in);
  } else {
    out.set_data(mx::allocator::malloc(out.nbytes()));
    auto* k = kernel(d, "copy_pool", in);
    enc.set_compute_pipeline_state(k);
    enc.set_input_array(in, 0);
    enc.set_output_array(out, 1);
    enc.set_vector_bytes(in.shape(), 2);
    enc.set_vector_bytes(strides_of(in), 3);
    MTL::Size grid(out.size(), 1, 1);
    MTL::Size group(
        std::min<size_t>(out.size(), k->maxTotalThreadsPerThreadgroup()), 1, 1);
    enc.dispatch_threads(grid, group);
  }

  int num_blocks = out.shape(0), heads = out.shape(1);
  int block = out.shape(2), dim = out.shape(3);
  for (size_t i = 0; i < entries_.size(); ++i) {
    const auto& e = entries_[i];
    const auto& src = inputs[2 + i];
    if (e.tokens == 0) {
      continue;
    }
    int ids_start = e.ids_start, first = e.first_token;
    auto* k = kernel(d, "scatter_blocks", src);
    enc.set_compute_pipeline_state(k);
    enc.set_input_array(src, 0);
    enc.set_input_array(ids, 1);
    enc.set_output_array(out, 2);
    enc.set_vector_bytes(strides_of(src), 3);
    enc.set_bytes(ids_start, 4);
    enc.set_bytes(first, 5);
    enc.set_bytes(num_blocks, 6);
    enc.set_bytes(heads, 7);
    enc.set_bytes(block, 8);
    enc.set_bytes(dim, 9);
    MTL::Size grid(dim, e.tokens, heads);
    MTL::Size group(std::min<size_t>(dim, k->maxTotalThreadsPerThreadgroup()),
                    1, 1);
    enc.dispatch_threads(grid, group);
  }
}

}  // namespace blockpool

#else  // no Metal in this build

namespace blockpool {

void GatherBlocks::eval_gpu(const std::vector<mx::array>&,
                            std::vector<mx::array>&) {
  throw std::runtime_error(
      "gather_blocks: this build has no GPU kernel; use the CPU stream or "
      "blockpool.reference.");
}

void GatherDequantizeBlocks::eval_gpu(const std::vector<mx::array>&,
                                      std::vector<mx::array>&) {
  throw std::runtime_error(
      "gather_dequantize_blocks: this build has no GPU kernel; use the CPU "
      "stream or blockpool.reference.");
}

void ScatterBlocks::eval_gpu(const std::vector<mx::array>&, mx::array&) {
  throw std::runtime_error(
      "scatter_blocks: this build has no GPU kernel; use the CPU stream or "
      "blockpool.reference.");
}

}  // namespace blockpool

#endif
