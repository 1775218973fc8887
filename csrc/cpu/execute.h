// Running a plan on the CPU, and the bookkeeping every eval_cpu shares.
#pragma once

#include <vector>

#include "mlx/backend/cpu/encoder.h"
#include "plans.h"

namespace blockpool::cpu {

// Runs each phase of `plan` in order (the segments of a phase on up to
// num_copy_threads() threads). `base[slot]` is the slot's first byte.
void run_copy_plan(const CopyPlan& plan, const std::vector<char*>& base);

// Dequantizes every segment, each into its output slot's dtype.
void run_dequant_plan(const std::vector<DequantSegment>& segments,
                      const std::vector<char*>& base,
                      const std::vector<Layout>& slots, int group_size,
                      int bits);

// Registers the inputs and outputs with the stream's CPU encoder, giving
// each output a fresh buffer.
mx::cpu::CommandEncoder& encode_io(mx::Stream stream,
                                   const std::vector<mx::array>& inputs,
                                   std::vector<mx::array>& outputs);

// The first byte of each input, then of each output.
std::vector<char*> base_pointers(const std::vector<mx::array>& inputs,
                                 const std::vector<mx::array>& outputs);

// For entries whose ids are an input (traced by mx.compile): where the ids
// will be once the producer has run. Other entries get {nullptr, 0}.
std::vector<IdSpan> traced_ids(const std::vector<BlockEntry>& entries,
                               const std::vector<mx::array>& inputs,
                               const char* op);

}  // namespace blockpool::cpu
