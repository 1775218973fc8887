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
