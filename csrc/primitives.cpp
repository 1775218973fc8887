// The backend-independent parts of the primitives: identity and shapes.
// eval_cpu lives in cpu/, eval_gpu in metal/.
#include "block_ops.h"

namespace blockpool {

bool GatherBlocks::is_equivalent(const mx::Primitive& other) const {
  const auto& o = static_cast<const GatherBlocks&>(other);
  return entries_ == o.entries_;
}

std::vector<mx::Shape> GatherBlocks::output_shapes(
    const std::vector<mx::array>& inputs) {
  std::vector<mx::Shape> shapes;
  shapes.reserve(entries_.size());
  for (const auto& e : entries_) {
    const auto& pool = inputs[e.pool];
    shapes.push_back({1, pool.shape(1),
                      static_cast<int>(e.num_ids * pool.shape(2)),
                      pool.shape(3)});
  }
  return shapes;
}

bool ScatterBlocks::is_equivalent(const mx::Primitive& other) const {
  const auto& o = static_cast<const ScatterBlocks&>(other);
  return entries_ == o.entries_;
}

std::vector<mx::Shape> ScatterBlocks::output_shapes(
    const std::vector<mx::array>& inputs) {
  return {inputs[0].shape()};
}

bool GatherDequantizeBlocks::is_equivalent(const mx::Primitive& other) const {
  const auto& o = static_cast<const GatherDequantizeBlocks&>(other);
  return entries_ == o.entries_ && group_size_ == o.group_size_ &&
         bits_ == o.bits_;
}

std::vector<mx::Shape> GatherDequantizeBlocks::output_shapes(
    const std::vector<mx::array>& inputs) {
  std::vector<mx::Shape> shapes;
  shapes.reserve(entries_.size());
  for (const auto& e : entries_) {
    const auto& packed = inputs[e.pool];
    shapes.push_back({1, packed.shape(1),
                      static_cast<int>(e.num_ids * packed.shape(2)),
                      packed.shape(3) * 32 / bits_});
  }
  return shapes;
}

}  // namespace blockpool
