#include "validation.h"

#include <sstream>
#include <stdexcept>

namespace blockpool {

void fail(const std::string& msg) {
  throw std::invalid_argument(msg);
}

std::string shape_str(const mx::Shape& shape) {
  std::ostringstream os;
  os << "(";
  for (size_t i = 0; i < shape.size(); ++i) {
    os << (i ? ", " : "") << shape[i];
  }
  os << ")";
  return os.str();
}

std::string where(const char* op, const char* what, size_t i) {
  return std::string(op) + ": " + what + "[" + std::to_string(i) + "]";
}

int DistinctInputs::add(const mx::array& a) {
  auto [it, inserted] =
      index_.emplace(a.id(), static_cast<int>(arrays_.size()));
  if (inserted) {
    arrays_.push_back(a);
  }
  return it->second;
}

void check_quantization(int group_size, int bits, const char* op) {
  if (bits != 2 && bits != 4 && bits != 8) {
    fail(std::string(op) + ": bits must be 2, 4 or 8, got " +
         std::to_string(bits) + ".");
  }
  if (group_size != 32 && group_size != 64 && group_size != 128) {
    fail(std::string(op) + ": group_size must be 32, 64 or 128, got " +
         std::to_string(group_size) + ".");
  }
}

std::string id_problem(int64_t id, int64_t num_blocks, size_t entry,
                       std::vector<char>* used, const char* op) {
  std::ostringstream os;
  if (id < 0 || id >= num_blocks) {
    os << op << ": block id " << id << " in block_ids[" << entry
       << "] is out of range for a pool of " << num_blocks << " blocks.";
    return os.str();
  }
  if (used) {
    if (used->empty()) {
      used->assign(num_blocks, 0);
    }
    if ((*used)[id]) {
      os << op << ": block id " << id << " appears more than once in one "
         << "scatter to the same pool (block_ids[" << entry << "]).";
      return os.str();
    }
    (*used)[id] = 1;
  }
  return {};
}

bool on_gpu(const mx::Stream& stream) {
  return stream.device.type == mx::Device::gpu;
}

}  // namespace blockpool
