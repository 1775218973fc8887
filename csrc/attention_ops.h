// The paged-attention ops: attention that reads K and V from blocks in
// place, and writing new tokens into blocks. Like the block ops, each op
// function validates its request and builds graph nodes; the kernels are
// in cpu/ and metal/.
#pragma once

#include <cstdint>
#include <optional>
#include <vector>

#include "mlx/ops.h"
#include "primitives.h"

namespace blockpool {

namespace mx = mlx::core;

// One block of a quantized layer: mx.quantize's packed uint32 data
// [H, B, D*bits/32] with its scales and biases [H, B, D/group].
struct QuantizedBlock {
  mx::array packed;
  mx::array scales;
  mx::array biases;
};

// What a paged_attention call attends with, besides the queries and blocks.
struct PagedAttentionOptions {
  float scale = 1.0f;
  int64_t window = 0;     // attend to at most this many positions (0: all)
  float softcap = 0.0f;   // scores become softcap * tanh(score / softcap) (0: off)
  std::optional<mx::array> sinks;  // [Hq]: one extra logit per head, no value
  std::vector<int32_t> ring_bases;  // per row (see block_index.h); empty: time order
  int group_size = 64;    // quantized blocks
  int bits = 0;           // quantized blocks (0: there are none)
};

// out[b, h, i] = attention of queries[b, h, i] (at position
// query_starts[b] + i) over the keys and values of row b, which holds
// context_lengths[b] tokens: logical block j of row b is
// block_tables[b][j], an index into key_blocks/value_blocks ([Hkv, B, D]
// and [Hkv, B, Dv], the queries' dtype) and then quantized_keys/values.
// Equal, bit for bit, to mlx.core.fast.scaled_dot_product_attention on
// the CPU over the same keys in mlx-lm's cache order (block_index.h).
mx::array paged_attention(const mx::array& queries,
                          const std::vector<mx::array>& key_blocks,
                          const std::vector<mx::array>& value_blocks,
                          const std::vector<QuantizedBlock>& quantized_keys,
                          const std::vector<QuantizedBlock>& quantized_values,
                          const std::vector<std::vector<int32_t>>& block_tables,
                          const std::vector<int32_t>& context_lengths,
                          const std::vector<int32_t>& query_starts,
                          const PagedAttentionOptions& options,
                          mx::StreamOrDevice s = {});

// One write: tokens [source_start, source_start + count) of row `row` of
// source [R, H, T, D] go to rows [offset, offset + count) of a block
// [H, block_tokens, D]: `dest` (its other rows kept) or, without one, a new
// block of zeros.
struct TokenWrite {
  int source = 0;  // index into the sources
  std::optional<mx::array> dest;
  int64_t row = 0;
  int64_t source_start = 0;
  int64_t count = 0;
  int64_t offset = 0;
};

// The blocks after each write, one node per write, so that a block nothing
// else references is written in place (a multi-output node would make
// every input look shared).
std::vector<mx::array> write_tokens(const std::vector<mx::array>& sources,
                                    const std::vector<TokenWrite>& writes,
                                    int64_t block_tokens,
                                    mx::StreamOrDevice s = {});

// Writes that could not reuse their destination's buffer (a copy of the
// whole block), since the process started: tests and benchmarks read it to
// check that decode writes its tokens in place.
void record_copied_write();
int64_t copied_writes();

}  // namespace blockpool
