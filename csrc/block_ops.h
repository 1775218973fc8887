// The block ops: validate a request, then build one graph node.
//
// Two families:
// - pooled ops work on a pool array [num_blocks, H, B, D] and block ids:
//   gather_blocks, scatter_blocks, gather_dequantize_blocks;
// - per-block ops work on separate block arrays [H, B, D], one per block:
//   concat_blocks, concat_dequantize_blocks, split_blocks.
// One call carries every entry (all layers, all planes), so a whole cache
// is one node (one per distinct pool for scatter).
//
// Errors found here throw std::invalid_argument (a ValueError in Python)
// before any graph is built. What can only be known at evaluation (ids
// traced by mx.compile, shapes under a shapeless compile) is checked by the
// primitive before it writes anything, and throws std::runtime_error.
#pragma once

#include <cstdint>
#include <optional>
#include <vector>

#include "mlx/ops.h"
#include "primitives.h"

namespace blockpool {

namespace mx = mlx::core;

// Block ids for one entry: host integers, or an integer array (read and
// checked when the graph is built, unless mx.compile traces it: then the
// kernel checks it before it writes anything, and only on the CPU).
struct BlockIds {
  std::vector<int64_t> host;
  std::optional<mx::array> device;
};

// out[i] = concat(pools[i][block_ids[i][j]] for j) on the token axis.
std::vector<mx::array> gather_blocks(const std::vector<mx::array>& pools,
                                     const std::vector<BlockIds>& block_ids,
                                     mx::StreamOrDevice s = {});

// Write sources[i] into pools[i] at block_ids[i], starting at token
// offsets[i] of the first block (0 when offsets is empty). Entries that pass
// the same pool array write into one updated copy of it, which every such
// entry gets back. A pool nothing else references is updated in place.
std::vector<mx::array> scatter_blocks(const std::vector<mx::array>& pools,
                                      const std::vector<BlockIds>& block_ids,
                                      const std::vector<mx::array>& sources,
                                      const std::vector<int64_t>& offsets,
                                      mx::StreamOrDevice s = {});

// Gather + dequantize of affine-quantized pools (mx.quantize layout: packed
// uint32 [N, H, B, D*bits/32], scales and biases [N, H, B, D/group]) into
// [1, H, n*B, D] in each entry's scales dtype, exactly as mx.dequantize.
std::vector<mx::array> gather_dequantize_blocks(
    const std::vector<mx::array>& packed, const std::vector<mx::array>& scales,
    const std::vector<mx::array>& biases,
    const std::vector<BlockIds>& block_ids, int group_size, int bits,
    mx::StreamOrDevice s = {});

// out[i] = blocks[i] ([H, B, D] each) joined on the token axis into
// [1, H, len(blocks[i]) * B, D].
std::vector<mx::array> concat_blocks(
    const std::vector<std::vector<mx::array>>& blocks,
    mx::StreamOrDevice s = {});

// The same over quantized blocks (packed [H, B, D*bits/32], scales and
// biases [H, B, D/group]), dequantized exactly as mx.dequantize.
std::vector<mx::array> concat_dequantize_blocks(
    const std::vector<std::vector<mx::array>>& packed,
    const std::vector<std::vector<mx::array>>& scales,
    const std::vector<std::vector<mx::array>>& biases, int group_size,
    int bits, mx::StreamOrDevice s = {});

// The inverse of concat_blocks: sources[i] [1, H, T, D] becomes
// ceil((offsets[i] + T) / block_tokens) new blocks [H, block_tokens, D].
// Position p holds source token p - offsets[i]; positions before the
// source come from heads[i] (or are zero), positions after it are zero.
std::vector<std::vector<mx::array>> split_blocks(
    const std::vector<mx::array>& sources, const std::vector<int64_t>& offsets,
    const std::vector<std::optional<mx::array>>& heads, int64_t block_tokens,
    mx::StreamOrDevice s = {});

}  // namespace blockpool
