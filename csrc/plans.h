// Copy plans: what each primitive moves, worked out from the arrays it
// actually receives, independent of the backend that runs it.
//
// Both backends build the same plan at evaluation: the CPU executes it with
// strided memcpy tiles (cpu/execute.cpp), Metal uploads it and runs one
// thread per copy unit (metal/). Building the plan is also where evaluation
// re-checks what the op function checked when the graph was built: under
// mx.compile the ids may be traced and, with shapeless=True, the shapes may
// have changed since. A failed check throws std::runtime_error before
// anything is written.
#pragma once

#include <cstdint>
#include <vector>

#include "block_index.h"
#include "mlx/array.h"
#include "primitives.h"

namespace blockpool {

namespace mx = mlx::core;
using blockpool_index::CopySegment;
using blockpool_index::DequantSegment;

// The layout of one buffer the plan refers to. Slots number the primitive's
// inputs first, then its outputs.
struct Layout {
  mx::Shape shape;
  mx::Strides strides;
  mx::Dtype dtype;
  int itemsize;
};

std::vector<Layout> layouts_of(const std::vector<mx::array>& inputs,
                               const std::vector<mx::array>& outputs);

// An entry's block ids as they are at evaluation.
struct IdSpan {
  const int32_t* data;
  int64_t count;
};

// Each entry's ids: `traced[i]` where entry i's ids are an input (traced by
// mx.compile), else its run of the primitive's host-known ids.
std::vector<IdSpan> id_spans(const std::vector<BlockEntry>& entries,
                             const std::vector<int32_t>& host,
                             const std::vector<IdSpan>& traced);

// Copy phases run in order; the segments of one phase write disjoint bytes
// and may run in any order or at once.
struct CopyPlan {
  std::vector<std::vector<CopySegment>> phases;
};

CopyPlan plan_gather(const std::vector<Layout>& slots, int num_inputs,
                     const std::vector<BlockEntry>& entries,
                     const std::vector<IdSpan>& ids);

// `donated`: the output already holds the pool's data (its buffer was
// reused); otherwise the first phase copies the pool into it.
CopyPlan plan_scatter(const std::vector<Layout>& slots, int num_inputs,
                      const std::vector<BlockEntry>& entries,
                      const std::vector<IdSpan>& ids, bool donated);

std::vector<DequantSegment> plan_gather_dequantize(
    const std::vector<Layout>& slots, int num_inputs,
    const std::vector<BlockEntry>& entries, const std::vector<IdSpan>& ids,
    int group_size, int bits);

CopyPlan plan_concat(const std::vector<Layout>& slots, int num_inputs,
                     const std::vector<JoinEntry>& entries,
                     const std::vector<int>& block_inputs);

std::vector<DequantSegment> plan_concat_dequantize(
    const std::vector<Layout>& slots, int num_inputs,
    const std::vector<JoinEntry>& entries,
    const std::vector<int>& block_inputs, int group_size, int bits);

CopyPlan plan_split(const std::vector<Layout>& slots, int num_inputs,
                    const std::vector<SplitEntry>& entries,
                    int64_t block_tokens);

// A write of new tokens into one block. Slots: the source [R, H, T, D], the
// destination block [H, B, D] when the params say there is one, then the
// output block. Unless the output took over the destination's buffer
// (`donated`), the destination's rows (zeros without one) are copied first;
// then the new tokens over them.
CopyPlan plan_write_tokens(const std::vector<Layout>& slots, int num_inputs,
                           const WriteTokensParams& params, bool donated);

// The output takes over `in`'s buffer when `in` is given and nothing else
// references it (returns true); otherwise it gets a new buffer.
bool adopt_or_allocate(const mx::array* in, mx::array& out);

// Checks the ids of every entry against its pool (and, for scatter, that no
// id repeats within one pool) before anything is written.
void check_ids_at_eval(const std::vector<Layout>& slots,
                       const std::vector<BlockEntry>& entries,
                       const std::vector<IdSpan>& ids, bool unique,
                       const char* op);

}  // namespace blockpool
