// The MLX primitives behind the block ops: what each graph node records.
//
// A primitive keeps only what cannot be read from its inputs: which input
// plays which role, host-known block ids, token offsets, quantization
// settings. Shapes are always read from the inputs, at evaluation and in
// output_shapes, so mx.compile(shapeless=True) recomputes them correctly.
// eval_cpu lives in cpu/, eval_gpu in metal/, identity and shapes in
// primitives.cpp.
#pragma once

#include <cstdint>
#include <utility>
#include <vector>

#include "mlx/primitives.h"

namespace blockpool {

namespace mx = mlx::core;

// One entry of a pooled primitive (gather, scatter, gather-dequantize).
struct BlockEntry {
  int pool = 0;        // input index of the pool (dequantize: packed plane)
  int scales = -1;     // dequantize: input index of the scales plane
  int biases = -1;     // dequantize: input index of the biases plane
  int source = -1;     // scatter: input index of the source
  int ids = -1;        // input index of ids traced by mx.compile, or -1
  int64_t ids_start = 0;    // host ids: first position in the id list
  int64_t num_ids = 0;      // host ids: how many
  int64_t first_token = 0;  // scatter: position of source token 0
  bool operator==(const BlockEntry&) const = default;
};

// One entry of a per-block primitive (concat, concat-dequantize): its blocks
// are block_inputs[start, start + count) (three per block for dequantize:
// packed, scales, biases).
struct JoinEntry {
  int64_t start = 0;
  int64_t count = 0;
  bool operator==(const JoinEntry&) const = default;
};

// One entry of split_blocks: `blocks` outputs [H, B, D] from a source.
struct SplitEntry {
  int source = 0;        // input index of the [1, H, T, D] source
  int head = -1;         // input index of the head block, or -1 (zeros)
  int64_t offset = 0;    // position of source token 0 in the first block
  int64_t blocks = 0;    // outputs of this entry
  bool operator==(const SplitEntry&) const = default;
};

// What a pooled primitive records: its entries, host-known ids and, to
// dequantize, the quantization.
struct PooledParams {
  std::vector<BlockEntry> entries;
  std::vector<int32_t> host_ids;
  int group_size = 0;
  int bits = 0;
  bool operator==(const PooledParams&) const = default;
};

// What a per-block join records: its entries, which input is each block
// (three per block to dequantize) and, to dequantize, the quantization.
struct JoinParams {
  std::vector<JoinEntry> entries;
  std::vector<int> block_inputs;
  int group_size = 0;
  int bits = 0;
  bool operator==(const JoinParams&) const = default;
};

struct SplitParams {
  std::vector<SplitEntry> entries;
  int64_t block_tokens = 0;
  bool operator==(const SplitParams&) const = default;
};

// What a paged attention node records (inputs: queries, [sinks], then per
// block its key and value arrays, then per quantized block its packed,
// scales and biases for keys and then for values).
struct PagedAttentionParams {
  std::vector<int32_t> tables;  // rows x width, -1 where a row holds no block
  int64_t width = 0;
  std::vector<int32_t> lengths;
  std::vector<int32_t> starts;
  std::vector<int32_t> ring_bases;  // empty: time order for every row
  float scale = 1.0f;
  int64_t window = 0;
  float softcap = 0.0f;
  bool has_sinks = false;
  int64_t full_blocks = 0;
  int64_t quantized_blocks = 0;
  int group_size = 0;
  int bits = 0;
  int64_t block_tokens = 0;
  bool operator==(const PagedAttentionParams&) const = default;
};

// One token write (inputs: the source, then the destination block if any).
struct WriteTokensParams {
  int64_t row = 0;
  int64_t source_start = 0;
  int64_t count = 0;
  int64_t offset = 0;
  int64_t block_tokens = 0;
  bool has_dest = false;
  bool operator==(const WriteTokensParams&) const = default;
};

using Arrays = std::vector<mx::array>;

// The declarations every block primitive shares: it records its parameters
// and nothing else, and two nodes are equivalent when their parameters are.
// Each primitive below adds its name and the backend entry points (eval_cpu
// in cpu/, eval_gpu in metal/, output_shapes in primitives.cpp).
template <typename Params, typename Base = mx::Primitive>
class BlockPrimitive : public Base {
 public:
  BlockPrimitive(mx::Stream stream, Params params)
      : Base(stream), params_(std::move(params)) {}
  bool is_equivalent(const mx::Primitive& other) const override {
    return params_ == static_cast<const BlockPrimitive&>(other).params_;
  }

 protected:
  Params params_;
};

// Inputs: [pools..., traced ids...]. Outputs: one [1, H, n*B, D] per entry.
class GatherBlocks : public BlockPrimitive<PooledParams> {
 public:
  using BlockPrimitive::BlockPrimitive;
  const char* name() const override { return "GatherBlocks"; }
  void eval_cpu(const Arrays& inputs, Arrays& outputs) override;
  void eval_gpu(const Arrays& inputs, Arrays& outputs) override;
  std::vector<mx::Shape> output_shapes(const Arrays& inputs) override;
};

// Inputs: [packed..., scales..., biases..., traced ids...] (roles by entry).
// Outputs: one float array per entry, in that entry's scales dtype.
class GatherDequantizeBlocks : public BlockPrimitive<PooledParams> {
 public:
  using BlockPrimitive::BlockPrimitive;
  const char* name() const override { return "GatherDequantizeBlocks"; }
  void eval_cpu(const Arrays& inputs, Arrays& outputs) override;
  void eval_gpu(const Arrays& inputs, Arrays& outputs) override;
  std::vector<mx::Shape> output_shapes(const Arrays& inputs) override;
};

// Inputs: [pool, sources..., traced ids...]. Output: the updated pool. One
// node per distinct pool array, single-output so MLX's buffer donation
// applies (every output of a multi-output node holds its own reference to
// the inputs, which would make the pool look shared).
class ScatterBlocks : public BlockPrimitive<PooledParams, mx::UnaryPrimitive> {
 public:
  using BlockPrimitive::BlockPrimitive;
  const char* name() const override { return "ScatterBlocks"; }
  void eval_cpu(const Arrays& inputs, mx::array& output) override;
  void eval_gpu(const Arrays& inputs, mx::array& output) override;
  std::vector<mx::Shape> output_shapes(const Arrays& inputs) override;
};

// Inputs: the distinct block arrays [H, B, D]. Outputs: one
// [1, H, n*B, D] per entry.
class ConcatBlocks : public BlockPrimitive<JoinParams> {
 public:
  using BlockPrimitive::BlockPrimitive;
  const char* name() const override { return "ConcatBlocks"; }
  void eval_cpu(const Arrays& inputs, Arrays& outputs) override;
  void eval_gpu(const Arrays& inputs, Arrays& outputs) override;
  std::vector<mx::Shape> output_shapes(const Arrays& inputs) override;
};

// Inputs: the distinct packed, scales and biases block arrays. Outputs: one
// float [1, H, n*B, D] per entry, in that entry's scales dtype.
class ConcatDequantizeBlocks : public BlockPrimitive<JoinParams> {
 public:
  using BlockPrimitive::BlockPrimitive;
  const char* name() const override { return "ConcatDequantizeBlocks"; }
  void eval_cpu(const Arrays& inputs, Arrays& outputs) override;
  void eval_gpu(const Arrays& inputs, Arrays& outputs) override;
  std::vector<mx::Shape> output_shapes(const Arrays& inputs) override;
};

// Inputs: the distinct sources and head blocks. Outputs: every entry's
// blocks [H, B, D], entry after entry.
class SplitBlocks : public BlockPrimitive<SplitParams> {
 public:
  using BlockPrimitive::BlockPrimitive;
  const char* name() const override { return "SplitBlocks"; }
  void eval_cpu(const Arrays& inputs, Arrays& outputs) override;
  void eval_gpu(const Arrays& inputs, Arrays& outputs) override;
  std::vector<mx::Shape> output_shapes(const Arrays& inputs) override;
};

// Inputs: see PagedAttentionParams. Output: [B, Hq, N, Dv] in the queries'
// dtype.
class PagedAttention
    : public BlockPrimitive<PagedAttentionParams, mx::UnaryPrimitive> {
 public:
  using BlockPrimitive::BlockPrimitive;
  const char* name() const override { return "PagedAttention"; }
  void eval_cpu(const Arrays& inputs, mx::array& output) override;
  void eval_gpu(const Arrays& inputs, mx::array& output) override;
  std::vector<mx::Shape> output_shapes(const Arrays& inputs) override;
};

// Inputs: [source, dest?]. Output: the written block [H, B, D], sharing the
// destination's buffer when nothing else references it.
class WriteTokens
    : public BlockPrimitive<WriteTokensParams, mx::UnaryPrimitive> {
 public:
  using BlockPrimitive::BlockPrimitive;
  const char* name() const override { return "WriteTokens"; }
  void eval_cpu(const Arrays& inputs, mx::array& output) override;
  void eval_gpu(const Arrays& inputs, mx::array& output) override;
  std::vector<mx::Shape> output_shapes(const Arrays& inputs) override;
};

}  // namespace blockpool
