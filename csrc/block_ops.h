// Block gather/scatter: the op functions and the primitives behind them.
//
// A pool is an array [num_blocks, H, B, D]. An entry is (pool, block ids):
// gather concatenates the entry's blocks along the token axis into
// [1, H, n*B, D]; scatter writes a [1, H, T, D] source back into them.
// One call carries every entry (all layers, all planes), so a whole cache
// is one graph node.
#pragma once

#include <cstdint>
#include <optional>
#include <vector>

#include "mlx/ops.h"
#include "mlx/primitives.h"

namespace blockpool {

namespace mx = mlx::core;

// Block ids for one entry, either host integers (validated eagerly) or an
// integer array (validated eagerly unless it is traced by mx.compile, in
// which case the kernel checks it before it writes anything).
struct BlockIds {
  std::vector<int64_t> host;
  std::optional<mx::array> device;
};

// Gather: out[i] = concat(pools[i][block_ids[i][j]] for j) on the token axis.
std::vector<mx::array> gather_blocks(
    const std::vector<mx::array>& pools,
    const std::vector<BlockIds>& block_ids,
    mx::StreamOrDevice s = {});

// Scatter: write sources[i] into pools[i] at block_ids[i], starting at token
// offsets[i] of the first block (0 when offsets is empty). Entries that pass
// the same pool array write into one updated copy of it, which every such
// entry gets back. A pool nothing else references is updated in place.
// Builds one graph node per distinct pool array.
std::vector<mx::array> scatter_blocks(
    const std::vector<mx::array>& pools,
    const std::vector<BlockIds>& block_ids,
    const std::vector<mx::array>& sources,
    const std::vector<int64_t>& offsets,
    mx::StreamOrDevice s = {});

// Gather + dequantize: blocks of affine-quantized pools (mx.quantize layout:
// packed uint32 [N, H, B, D*bits/32], scales and biases [N, H, B, D/group])
// come out as float [1, H, n*B, D] in the scales' dtype, computed exactly as
// mx.dequantize does. The same pool triple may appear in several entries.
std::vector<mx::array> gather_dequantize_blocks(
    const std::vector<mx::array>& packed,
    const std::vector<mx::array>& scales,
    const std::vector<mx::array>& biases,
    const std::vector<BlockIds>& block_ids,
    int group_size,
    int bits,
    mx::StreamOrDevice s = {});

// One entry of a primitive: which pool input it uses, where its
// ids start in the flat id array, how many ids, and (scatter only) the
// number of source tokens and their first position in the first block.
struct BlockEntry {
  int pool;
  int64_t ids_start;
  int64_t num_ids;
  int64_t tokens;
  int64_t first_token;
  bool operator==(const BlockEntry&) const = default;
};

// Inputs: [pools..., flat_ids]. Outputs: one array per entry.
class GatherBlocks : public mx::Primitive {
 public:
  GatherBlocks(mx::Stream stream, std::vector<BlockEntry> entries)
      : mx::Primitive(stream), entries_(std::move(entries)) {}

  void eval_cpu(const std::vector<mx::array>& inputs,
                std::vector<mx::array>& outputs) override;
  void eval_gpu(const std::vector<mx::array>& inputs,
                std::vector<mx::array>& outputs) override;

  const char* name() const override { return "GatherBlocks"; }
  bool is_equivalent(const mx::Primitive& other) const override;
  std::vector<mx::Shape> output_shapes(
      const std::vector<mx::array>& inputs) override;

  const std::vector<BlockEntry>& entries() const { return entries_; }

 private:
  std::vector<BlockEntry> entries_;
};

// Inputs: [packed..., scales..., biases..., flat_ids], one of each per
// distinct pool triple. Outputs: one float array per entry.
class GatherDequantizeBlocks : public mx::Primitive {
 public:
  GatherDequantizeBlocks(mx::Stream stream, std::vector<BlockEntry> entries,
                         int group_size, int bits)
      : mx::Primitive(stream),
        entries_(std::move(entries)),
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

  const std::vector<BlockEntry>& entries() const { return entries_; }
  int group_size() const { return group_size_; }
  int bits() const { return bits_; }

 private:
  std::vector<BlockEntry> entries_;
  int group_size_;
  int bits_;
};

// Inputs: [pool, flat_ids, sources...]. Output: the updated pool. One node
// per distinct pool array, single-output so MLX's buffer donation applies
// (every output of a multi-output node holds its own reference to the
// inputs, which would make the pool look shared).
class ScatterBlocks : public mx::UnaryPrimitive {
 public:
  ScatterBlocks(mx::Stream stream, std::vector<BlockEntry> entries)
      : mx::UnaryPrimitive(stream), entries_(std::move(entries)) {}

  void eval_cpu(const std::vector<mx::array>& inputs,
                mx::array& output) override;
  void eval_gpu(const std::vector<mx::array>& inputs,
                mx::array& output) override;

  const char* name() const override { return "ScatterBlocks"; }
  bool is_equivalent(const mx::Primitive& other) const override;
  std::vector<mx::Shape> output_shapes(
      const std::vector<mx::array>& inputs) override;

  const std::vector<BlockEntry>& entries() const { return entries_; }

 private:
  std::vector<BlockEntry> entries_;
};

}  // namespace blockpool
