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

bool GatherBlocks::is_equivalent(const mx::Primitive& other) const {
  const auto& o = static_cast<const GatherBlocks&>(other);
  return entries_ == o.entries_ && host_ids_ == o.host_ids_;
}

std::vector<mx::Shape> GatherBlocks::output_shapes(
    const std::vector<mx::array>& inputs) {
  std::vector<mx::Shape> shapes;
  for (const auto& e : entries_) {
    const auto& pool = inputs[e.pool];
    shapes.push_back({1, pool.shape(1),
                      checked_tokens(num_ids(e, inputs) * pool.shape(2),
                                     "gather_blocks"),
                      pool.shape(3)});
  }
  return shapes;
}

bool ScatterBlocks::is_equivalent(const mx::Primitive& other) const {
  const auto& o = static_cast<const ScatterBlocks&>(other);
  return entries_ == o.entries_ && host_ids_ == o.host_ids_;
}

std::vector<mx::Shape> ScatterBlocks::output_shapes(
    const std::vector<mx::array>& inputs) {
  return {inputs[0].shape()};
}

bool GatherDequantizeBlocks::is_equivalent(const mx::Primitive& other) const {
  const auto& o = static_cast<const GatherDequantizeBlocks&>(other);
  return entries_ == o.entries_ && host_ids_ == o.host_ids_ &&
         group_size_ == o.group_size_ && bits_ == o.bits_;
}

std::vector<mx::Shape> GatherDequantizeBlocks::output_shapes(
    const std::vector<mx::array>& inputs) {
  std::vector<mx::Shape> shapes;
  for (const auto& e : entries_) {
    const auto& packed = inputs[e.pool];
    shapes.push_back(
        {1, packed.shape(1),
         checked_tokens(num_ids(e, inputs) * packed.shape(2),
                        "gather_dequantize_blocks"),
         packed.shape(3) * blockpool_index::values_per_word(bits_)});
  }
  return shapes;
}

bool ConcatBlocks::is_equivalent(const mx::Primitive& other) const {
  const auto& o = static_cast<const ConcatBlocks&>(other);
  return entries_ == o.entries_ && block_inputs_ == o.block_inputs_;
}

std::vector<mx::Shape> ConcatBlocks::output_shapes(
    const std::vector<mx::array>& inputs) {
  std::vector<mx::Shape> shapes;
  for (const auto& e : entries_) {
    const auto& first = inputs[block_inputs_[e.start]];
    shapes.push_back({1, first.shape(0),
                      checked_tokens(e.count * first.shape(1), "concat_blocks"),
                      first.shape(2)});
  }
  return shapes;
}

bool ConcatDequantizeBlocks::is_equivalent(const mx::Primitive& other) const {
  const auto& o = static_cast<const ConcatDequantizeBlocks&>(other);
  return entries_ == o.entries_ && block_inputs_ == o.block_inputs_ &&
         group_size_ == o.group_size_ && bits_ == o.bits_;
}

std::vector<mx::Shape> ConcatDequantizeBlocks::output_shapes(
    const std::vector<mx::array>& inputs) {
  std::vector<mx::Shape> shapes;
  for (const auto& e : entries_) {
    const auto& packed = inputs[block_inputs_[3 * e.start]];
    shapes.push_back(
        {1, packed.shape(0),
         checked_tokens(e.count * packed.shape(1), "concat_dequantize_blocks"),
         packed.shape(2) * blockpool_index::values_per_word(bits_)});
  }
  return shapes;
}

bool SplitBlocks::is_equivalent(const mx::Primitive& other) const {
  const auto& o = static_cast<const SplitBlocks&>(other);
  return entries_ == o.entries_ && block_tokens_ == o.block_tokens_;
}

std::vector<mx::Shape> SplitBlocks::output_shapes(
    const std::vector<mx::array>& inputs) {
  // The number of outputs was fixed when the graph was traced; a shapeless
  // call whose sources need another number of blocks cannot reuse it.
  std::vector<mx::Shape> shapes;
  for (size_t i = 0; i < entries_.size(); ++i) {
    const auto& e = entries_[i];
    const auto& src = inputs[e.source];
    int64_t needed =
        blockpool_index::blocks_for(e.offset, src.shape(2), block_tokens_);
    if (needed != e.blocks) {
      std::ostringstream os;
      os << "split_blocks: sources[" << i << "] now has " << src.shape(2)
         << " tokens, which need " << needed << " blocks, but the compiled "
         << "graph returns " << e.blocks << "; under mx.compile(shapeless="
         << "True) the number of blocks per entry cannot change.";
      throw std::invalid_argument(os.str());
    }
    for (int64_t b = 0; b < e.blocks; ++b) {
      shapes.push_back({src.shape(1), static_cast<int>(block_tokens_),
                        src.shape(3)});
    }
  }
  return shapes;
}

}  // namespace blockpool
