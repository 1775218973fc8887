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

// Inputs: [pools..., traced ids...]. Outputs: one [1, H, n*B, D] per entry.
class GatherBlocks : public mx::Primitive {
 public:
  GatherBlocks(mx::Stream stream, std::vector<BlockEntry> entries,
               std::vector<int32_t> host_ids)
      : mx::Primitive(stream),
        entries_(std::move(entries)),
        host_ids_(std::move(host_ids)) {}

  void eval_cpu(const std::vector<mx::array>& inputs,
                std::vector<mx::array>& outputs) override;
  void eval_gpu(const std::vector<mx::array>& inputs,
                std::vector<mx::array>& outputs) override;
  const char* name() const override { return "GatherBlocks"; }
  bool is_equivalent(const mx::Primitive& other) const override;
  std::vector<mx::Shape> output_shapes(
      const std::vector<mx::array>& inputs) override;

 private:
  std::vector<BlockEntry> entries_;
  std::vector<int32_t> host_ids_;
};

// Inputs: [packed..., scales..., biases..., traced ids...] (roles by entry).
// Outputs: one float array per entry, in that entry's scales dtype.
class GatherDequantizeBlocks : public mx::Primitive {
 public:
  GatherDequantizeBlocks(mx::Stream stream, std::vector<BlockEntry> entries,
                         std::vector<int32_t> host_ids, int group_size,
                         int bits)
      : mx::Primitive(stream),
        entries_(std::move(entries)),
        host_ids_(std::move(host_ids)),
        group_size_(group_size),
        bits_(bits) {}

  void eval_cpu(const std::vector<mx::array>& inputs,
                std::vector<mx::array>& outputs) override;
  void eval_gpu(const std::vector<mx::array>& inputs,
                std::vector<mx::array>& outputs) override;
  const char* name() const override { return "GatherDequantizeBlocks"; }
  bool is_equivalent(const mx::Primitive& other) const override;
  std::vector<mx::Shape> output_shapes(
      const std::vector<mx::array>& inputs) override;

 private:
  std::vector<BlockEntry> entries_;
  std::vector<int32_t> host_ids_;
  int group_size_;
  int bits_;
};

// Inputs: [pool, sources..., traced ids...]. Output: the updated pool. One
// node per distinct pool array, single-output so MLX's buffer donation
// applies (every output of a multi-output node holds its own reference to
// the inputs, which would make the pool look shared).
class ScatterBlocks : public mx::UnaryPrimitive {
 public:
  ScatterBlocks(mx::Stream stream, std::vector<BlockEntry> entries,
                std::vector<int32_t> host_ids)
      : mx::UnaryPrimitive(stream),
        entries_(std::move(entries)),
        host_ids_(std::move(host_ids)) {}

  void eval_cpu(const std::vector<mx::array>& inputs,
                mx::array& output) override;
  void eval_gpu(const std::vector<mx::array>& inputs,
                mx::array& output) override;
  const char* name() const override { return "ScatterBlocks"; }
  bool is_equivalent(const mx::Primitive& other) const override;
  std::vector<mx::Shape> output_shapes(
      const std::vector<mx::array>& inputs) override;

 private:
  std::vector<BlockEntry> entries_;
  std::vector<int32_t> host_ids_;
};

// Inputs: the distinct block arrays [H, B, D]. Outputs: one
// [1, H, n*B, D] per entry.
class ConcatBlocks : public mx::Primitive {
 public:
  ConcatBlocks(mx::Stream stream, std::vector<JoinEntry> entries,
               std::vector<int> block_inputs)
      : mx::Primitive(stream),
        entries_(std::move(entries)),
        block_inputs_(std::move(block_inputs)) {}

  void eval_cpu(const std::vector<mx::array>& inputs,
                std::vector<mx::array>& outputs) override;
  void eval_gpu(const std::vector<mx::array>& inputs,
                std::vector<mx::array>& outputs) override;
  const char* name() const override { return "ConcatBlocks"; }
  bool is_equivalent(const mx::Primitive& other) const override;
  std::vector<mx::Shape> output_shapes(
      const std::vector<mx::array>& inputs) override;

 private:
  std::vector<JoinEntry> entries_;
  std::vector<int> block_inputs_;
};

// Inputs: the distinct packed, scales and biases block arrays. Outputs: one
// float [1, H, n*B, D] per entry, in that entry's scales dtype.
class ConcatDequantizeBlocks : public mx::Primitive {
 public:
  ConcatDequantizeBlocks(mx::Stream stream, std::vector<JoinEntry> entries,
                         std::vector<int> block_inputs, int group_size,
                         int bits)
      : mx::Primitive(stream),
        entries_(std::move(entries)),
        block_inputs_(std::move(block_inputs)),
        group_size_(group_size),
        bits_(bits) {}

  void eval_cpu(const std::vector<mx::array>& inputs,
                std::vector<mx::array>& outputs) override;
  void eval_gpu(const std::vector<mx::array>& inputs,
                std::vector<mx::array>& outputs) override;
  const char* name() const override { return "ConcatDequantizeBlocks"; }
  bool is_equivalent(const mx::Primitive& other) const override;
  std::vector<mx::Shape> output_shapes(
      const std::vector<mx::array>& inputs) override;

 private:
  std::vector<JoinEntry> entries_;
  std::vector<int> block_inputs_;
  int group_size_;
  int bits_;
};

// Inputs: the distinct sources and head blocks. Outputs: every entry's
// blocks [H, B, D], entry after entry.
class SplitBlocks : public mx::Primitive {
 public:
  SplitBlocks(mx::Stream stream, std::vector<SplitEntry> entries,
              int64_t block_tokens)
      : mx::Primitive(stream),
        entries_(std::move(entries)),
        block_tokens_(block_tokens) {}

  void eval_cpu(const std::vector<mx::array>& inputs,
                std::vector<mx::array>& outputs) override;
  void eval_gpu(const std::vector<mx::array>& inputs,
                std::vector<mx::array>& outputs) override;
  const char* name() const override { return "SplitBlocks"; }
  bool is_equivalent(const mx::Primitive& other) const override;
  std::vector<mx::Shape> output_shapes(
      const std::vector<mx::array>& inputs) override;

 private:
  std::vector<SplitEntry> entries_;
  int64_t block_tokens_;
};

}  // namespace blockpool
