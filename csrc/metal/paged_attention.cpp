// Metal evaluation of PagedAttention and WriteTokens (kernels:
// metal/paged_attention.metal and block_copy.metal). Without Metal kernels in
// the build, eval_gpu raises and blockpool.ops routes GPU streams to the
// pure-MLX reference.
//
// NOT BUILT OR RUN IN THIS PROJECT'S CI: Linux cannot compile Metal. This
// file is compiled with BLOCKPOOL_METAL only when the configure-time check
// in CMakeLists.txt compiled the kernels and this host code.
//
// Paged attention binds every array it reads (MLX tracks hazards through the
// bindings: see dispatch.cpp), at most kMaxArrays per dispatch, so the blocks
// are split into parts that fit: each part's dispatch writes a partial
// softmax per query, and a merge dispatch combines the parts.
#include <stdexcept>
#include <string>

#include "primitives.h"

#ifdef BLOCKPOOL_METAL

#include "attention_ops.h"

#include <algorithm>
#include <cstring>

#include "metal/dispatch.h"
#include "mlx/allocator.h"
#include "mlx/backend/metal/device.h"
#include "mlx/backend/metal/utils.h"
#include "plans.h"

namespace blockpool {

namespace {

namespace bi = blockpool_index;

std::string type_name(mx::Dtype dtype) {
  return dtype == mx::float32 ? "float32" : dtype == mx::float16 ? "float16" : "bfloat16";
}

// An int32 buffer holding `data`, released when the command buffer is done.
mx::array upload_ints(const std::vector<int32_t>& data,
                      mx::metal::CommandEncoder& enc) {
  mx::array table({static_cast<int>(data.size())}, mx::int32, nullptr, {});
  table.set_data(mx::allocator::malloc(data.size() * sizeof(int32_t)));
  std::memcpy(table.data<char>(), data.data(), data.size() * sizeof(int32_t));
  enc.add_temporary(table);
  return table;
}

}  // namespace

void PagedAttention::eval_gpu(const std::vector<mx::array>& inputs,
                              mx::array& out) {
  const auto& p = params_;
  const auto& q = inputs[0];
  out.set_data(mx::allocator::malloc(out.nbytes()));
  auto& enc = mx::metal::get_command_encoder(stream());

  int first_block = p.has_sinks ? 2 : 1;
  int64_t blocks = p.full_blocks + p.quantized_blocks;
  int v_dim = out.shape(3);
  if (q.shape(3) > 32 * 8 || v_dim > 32 * 8) {
    throw std::runtime_error("paged_attention: the Metal kernel takes head dims up to 256.");
  }
  // Blocks of one kind per part, as many as the bindings allow besides the
  // queries and the partial results.
  std::vector<std::pair<int64_t, int64_t>> parts;  // [first, last) global block
  int full_per_part = (metal::kMaxArrays - 2) / 2;
  int quantized_per_part = (metal::kMaxArrays - 2) / 6;
  for (int64_t b = 0; b < p.full_blocks; b += full_per_part) {
    parts.emplace_back(b, std::min<int64_t>(p.full_blocks, b + full_per_part));
  }
  for (int64_t b = p.full_blocks; b < blocks; b += quantized_per_part) {
    parts.emplace_back(b, std::min<int64_t>(blocks, b + quantized_per_part));
  }
  int64_t rows = q.shape(0);
  int64_t items = rows * q.shape(1) * q.shape(2);
  mx::array partial({static_cast<int>(parts.size() * items * (v_dim + 2))},
                    mx::float32, nullptr, {});
  partial.set_data(mx::allocator::malloc(partial.nbytes()));
  enc.add_temporary(partial);

  bi::PagedDispatch dispatch{};
  for (int k = 0; k < 4; ++k) {
    dispatch.query_strides[k] = q.strides(k);
  }
  dispatch.rows = static_cast<int32_t>(rows);
  dispatch.q_heads = q.shape(1);
  dispatch.kv_heads = inputs[first_block].shape(0);
  dispatch.queries = q.shape(2);
  dispatch.dim = q.shape(3);
  dispatch.v_dim = v_dim;
  dispatch.block_tokens = static_cast<int32_t>(p.block_tokens);
  dispatch.width = static_cast<int32_t>(p.width);
  dispatch.window = static_cast<int32_t>(p.window);
  dispatch.group_size = p.group_size;
  dispatch.parts = static_cast<int32_t>(parts.size());
  dispatch.has_sinks = p.has_sinks ? 1 : 0;
  dispatch.scale = p.scale;
  dispatch.softcap = p.softcap;

  auto* partial_kernel = metal::blockpool_kernel(stream(), "paged_partial_" + type_name(out.dtype()));
  for (size_t part = 0; part < parts.size(); ++part) {
    auto [lo, hi] = parts[part];
    bool quantized = lo >= p.full_blocks;
    std::vector<int32_t> table(rows * p.width + 3 * rows, -1);
    for (int64_t i = 0; i < rows * p.width; ++i) {
      int32_t global = p.tables[i];
      if (global >= lo && global < hi) {
        table[i] = static_cast<int32_t>(global - lo);
      }
    }
    for (int64_t b = 0; b < rows; ++b) {
      table[rows * p.width + b] = p.lengths[b];
      table[rows * p.width + rows + b] = p.starts[b];
      table[rows * p.width + 2 * rows + b] = p.ring_bases.empty() ? -1 : p.ring_bases[b];
    }
    dispatch.part = static_cast<int32_t>(part);
    dispatch.bits = quantized ? p.bits : 0;
    enc.set_compute_pipeline_state(partial_kernel);
    enc.set_input_array(upload_ints(table, enc), metal::kTableSlot);
    enc.set_bytes(dispatch, metal::kParamsSlot);
    enc.set_input_array(q, metal::kFirstArraySlot);
    enc.set_output_array(partial, metal::kFirstArraySlot + 1);
    int planes = quantized ? 6 : 2;
    for (int64_t g = lo; g < hi; ++g) {
      int64_t input = quantized ? first_block + 2 * p.full_blocks + 6 * (g - p.full_blocks)
                                : first_block + 2 * g;
      for (int plane = 0; plane < planes; ++plane) {
        enc.set_input_array(inputs[input + plane],
                            metal::kFirstArraySlot + 2 + (g - lo) * planes + plane);
      }
    }
    MTL::Size grid(32, items, 1);
    enc.dispatch_threads(grid, MTL::Size(32, 1, 1));
  }

  auto* merge_kernel = metal::blockpool_kernel(stream(), "paged_merge_" + type_name(out.dtype()));
  enc.set_compute_pipeline_state(merge_kernel);
  enc.set_input_array(upload_ints({0}, enc), metal::kTableSlot);
  enc.set_bytes(dispatch, metal::kParamsSlot);
  enc.set_input_array(partial, metal::kFirstArraySlot);
  enc.set_output_array(out, metal::kFirstArraySlot + 1);
  if (p.has_sinks) {
    enc.set_input_array(inputs[1], metal::kFirstArraySlot + 2);
  }
  MTL::Size grid(v_dim, items, 1);
  enc.dispatch_threads(grid, MTL::Size(std::min(v_dim, 32), 1, 1));
}

void WriteTokens::eval_gpu(const std::vector<mx::array>& inputs,
                           mx::array& out) {
  const auto& p = params_;
  bool donated = adopt_or_allocate(p.has_dest ? &inputs[1] : nullptr, out);
  if (p.has_dest && !donated) {
    record_copied_write();
  }
  std::vector<mx::array> outputs{out};
  auto plan = plan_write_tokens(layouts_of(inputs, outputs),
                                static_cast<int>(inputs.size()), p, donated);
  metal::encode_copy_plan(stream(), plan, inputs, outputs);
}

}  // namespace blockpool

#else  // no Metal kernels in this build

namespace blockpool {

void PagedAttention::eval_gpu(const std::vector<mx::array>&, mx::array&) {
  throw std::runtime_error(
      "paged_attention: this build has no GPU kernel; blockpool.ops uses the "
      "pure-MLX reference on GPU streams (see blockpool.ops.backend).");
}

void WriteTokens::eval_gpu(const std::vector<mx::array>&, mx::array&) {
  throw std::runtime_error(
      "write_tokens: this build has no GPU kernel; blockpool.ops uses the "
      "pure-MLX reference on GPU streams (see blockpool.ops.backend).");
}

}  // namespace blockpool

#endif
