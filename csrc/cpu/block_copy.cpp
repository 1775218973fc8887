// CPU evaluation of the copying primitives: gather, scatter, concat, split.
//
// Each runs as one task on the stream's CPU encoder. Block ids traced by
// mx.compile are only readable once earlier tasks have run, so the plan is
// built (and every id and shape checked) inside the task, before anything
// is written. The task captures plain data, never arrays: the encoder keeps
// the buffers alive, and the primitive may be gone by the time it runs.
#include "cpu/execute.h"
#include "mlx/allocator.h"
#include "mlx/backend/cpu/encoder.h"

namespace blockpool {


void GatherBlocks::eval_cpu(const std::vector<mx::array>& inputs,
                            std::vector<mx::array>& outputs) {
  auto& encoder = cpu::encode_io(stream(), inputs, outputs);
  encoder.dispatch([slots = layouts_of(inputs, outputs),
                    base = cpu::base_pointers(inputs, outputs),
                    traced = cpu::traced_ids(params_.entries, inputs, "gather_blocks"),
                    num_inputs = static_cast<int>(inputs.size()),
                    entries = params_.entries, host = params_.host_ids]() {
    auto ids = id_spans(entries, host, traced);
    cpu::run_copy_plan(plan_gather(slots, num_inputs, entries, ids), base);
  });
}

void ScatterBlocks::eval_cpu(const std::vector<mx::array>& inputs,
                             mx::array& out) {
  auto& encoder = mx::cpu::get_command_encoder(stream());
  const auto& in = inputs[0];
  for (const auto& a : inputs) {
    encoder.set_input_array(a);
  }
  // The output takes over the input's buffer when nothing else references
  // the input; otherwise it starts as a full copy of it. A bad id found in
  // the task leaves a donated pool as it was: nothing is written before
  // every check passed.
  bool donated = adopt_or_allocate(&in, out);
  encoder.set_output_array(out);
  std::vector<mx::array> outputs{out};
  encoder.dispatch([slots = layouts_of(inputs, outputs),
                    base = cpu::base_pointers(inputs, outputs),
                    traced = cpu::traced_ids(params_.entries, inputs, "scatter_blocks"),
                    num_inputs = static_cast<int>(inputs.size()),
                    entries = params_.entries, host = params_.host_ids, donated]() {
    auto ids = id_spans(entries, host, traced);
    cpu::run_copy_plan(plan_scatter(slots, num_inputs, entries, ids, donated),
                       base);
  });
}

void ConcatBlocks::eval_cpu(const std::vector<mx::array>& inputs,
                            std::vector<mx::array>& outputs) {
  auto& encoder = cpu::encode_io(stream(), inputs, outputs);
  encoder.dispatch([slots = layouts_of(inputs, outputs),
                    base = cpu::base_pointers(inputs, outputs),
                    num_inputs = static_cast<int>(inputs.size()),
                    entries = params_.entries, block_inputs = params_.block_inputs]() {
    cpu::run_copy_plan(plan_concat(slots, num_inputs, entries, block_inputs),
                       base);
  });
}

void SplitBlocks::eval_cpu(const std::vector<mx::array>& inputs,
                           std::vector<mx::array>& outputs) {
  auto& encoder = cpu::encode_io(stream(), inputs, outputs);
  encoder.dispatch([slots = layouts_of(inputs, outputs),
                    base = cpu::base_pointers(inputs, outputs),
                    num_inputs = static_cast<int>(inputs.size()),
                    entries = params_.entries, block_tokens = params_.block_tokens]() {
    cpu::run_copy_plan(plan_split(slots, num_inputs, entries, block_tokens),
                       base);
  });
}

}  // namespace blockpool
