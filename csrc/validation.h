// What the op functions share: typed failures, messages, distinct inputs.
#pragma once

#include <cstdint>
#include <string>
#include <unordered_map>
#include <vector>

#include "mlx/array.h"
#include "mlx/stream.h"

namespace blockpool {

namespace mx = mlx::core;

// Bad input found while building the graph: std::invalid_argument, which
// the bindings turn into a ValueError (blockpool.ops raises it as
// InvalidRequestError).
[[noreturn]] void fail(const std::string& msg);

std::string shape_str(const mx::Shape& shape);

// "op: what[i]" for messages.
std::string where(const char* op, const char* what, size_t i);

// Arrays deduplicated by identity: an array passed in several entries is
// one input of the node, read (or written) once.
class DistinctInputs {
 public:
  // The input index of `a`, adding it if it is new.
  int add(const mx::array& a);
  std::vector<mx::array>& arrays() { return arrays_; }
  size_t size() const { return arrays_.size(); }

 private:
  std::vector<mx::array> arrays_;
  std::unordered_map<std::uintptr_t, int> index_;
};

void check_quantization(int group_size, int bits, const char* op);

// What is wrong with block id `id` of entry `entry` for a pool of
// `num_blocks` blocks, or "" if nothing. With `used` (one flag per block of
// that pool, sized by the caller), an id may appear only once: it is marked.
// The op functions throw the answer as std::invalid_argument, evaluation as
// std::runtime_error.
std::string id_problem(int64_t id, int64_t num_blocks, size_t entry,
                       std::vector<char>* used, const char* op);

bool on_gpu(const mx::Stream& stream);

}  // namespace blockpool
