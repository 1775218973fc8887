// The backend-independent parts of the primitives: identity and shapes.
// Shapes come from the inputs, so a shapeless mx.compile gets the shapes of
// the arrays it is called with, not those it was traced with.
#include <sstream>
#include <stdexcept>

#include "block_index.h"
#include "primitives.h"

namespace blockpool {

namespace {

int64_t num_ids(const BlockEntry& e, const std::vector<mx::array>& inputs) {
  return e.ids < 0 ? e.num_ids : static_cast<int64_t>(inputs[e.ids].size());
}

int checked_tokens(int64_t tokens, const char* op) {
  if (tokens > INT32_MAX) {
    throw std::invalid_argument(std::string(op) +
                                ": too many tokens for one entry.");
  }
  return static_cast<int>(tokens);
}

}  // namespace

std::vector<mx::Shape> GatherBlocks::output_shapes(
    const std::vector<mx::array>& inputs) {
  std::vector<mx::Shape> shapes;
  for (const auto& e : params_.entries) {
    const auto& pool = inputs[e.pool];
    shapes.push_back({1, pool.shape(1),
                      checked_tokens(num_ids(e, inputs) * pool.shape(2),
                                     "gather_blocks"),
                      pool.shape(3)});
  }
  return shapes;
}

std::vector<mx::Shape> ScatterBlocks::output_shapes(
    const std::vector<mx::array>& inputs) {
  return {inputs[0].shape()};
}

std::vector<mx::Shape> GatherDequantizeBlocks::output_shapes(
    const std::vector<mx::array>& inputs) {
  std::vector<mx::Shape> shapes;
  for (const auto& e : params_.entries) {
    const auto& packed = inputs[e.pool];
    shapes.push_back(
        {1, packed.shape(1),
         checked_tokens(num_ids(e, inputs) * packed.shape(2),
                        "gather_dequantize_blocks"),
         packed.shape(3) * blockpool_index::values_per_word(params_.bits)});
  }
  return shapes;
}

std::vector<mx::Shape> ConcatBlocks::output_shapes(
    const std::vector<mx::array>& inputs) {
  std::vector<mx::Shape> shapes;
  for (const auto& e : params_.entries) {
    const auto& first = inputs[params_.block_inputs[e.start]];
    shapes.push_back({1, first.shape(0),
                      checked_tokens(e.count * first.shape(1), "concat_blocks"),
                      first.shape(2)});
  }
  return shapes;
}

std::vector<mx::Shape> ConcatDequantizeBlocks::output_shapes(
    const std::vector<mx::array>& inputs) {
  std::vector<mx::Shape> shapes;
  for (const auto& e : params_.entries) {
    const auto& packed = inputs[params_.block_inputs[3 * e.start]];
    shapes.push_back(
        {1, packed.shape(0),
         checked_tokens(e.count * packed.shape(1), "concat_dequantize_blocks"),
         packed.shape(2) * blockpool_index::values_per_word(params_.bits)});
  }
  return shapes;
}

std::vector<mx::Shape> SplitBlocks::output_shapes(
    const std::vector<mx::array>& inputs) {
  // The number of outputs was fixed when the graph was traced; a shapeless
  // call whose sources need another number of blocks cannot reuse it.
  std::vector<mx::Shape> shapes;
  for (size_t i = 0; i < params_.entries.size(); ++i) {
    const auto& e = params_.entries[i];
    const auto& src = inputs[e.source];
    int64_t needed =
        blockpool_index::blocks_for(e.offset, src.shape(2), params_.block_tokens);
    if (needed != e.blocks) {
      std::ostringstream os;
      os << "split_blocks: sources[" << i << "] now has " << src.shape(2)
         << " tokens, which need " << needed << " blocks, but the compiled "
         << "graph returns " << e.blocks << "; under mx.compile(shapeless="
         << "True) the number of blocks per entry cannot change.";
      throw std::invalid_argument(os.str());
    }
    for (int64_t b = 0; b < e.blocks; ++b) {
      shapes.push_back({src.shape(1), static_cast<int>(params_.block_tokens),
                        src.shape(3)});
    }
  }
  return shapes;
}

std::vector<mx::Shape> PagedAttention::output_shapes(
    const std::vector<mx::array>& inputs) {
  const auto& q = inputs[0];
  int first_block = params_.has_sinks ? 2 : 1;
  int v_dim = params_.full_blocks > 0
                  ? inputs[first_block + 1].shape(2)
                  : inputs[first_block + 4].shape(2) * params_.group_size;
  return {{q.shape(0), q.shape(1), q.shape(2), v_dim}};
}

std::vector<mx::Shape> WriteTokens::output_shapes(
    const std::vector<mx::array>& inputs) {
  const auto& src = inputs[0];
  return {{src.shape(1), static_cast<int>(params_.block_tokens), src.shape(3)}};
}

}  // namespace blockpool
