// Metal evaluation of PagedAttention and WriteTokens: see
// csrc/metal/paged_attention.metal. Without Metal kernels in the build,
// eval_gpu raises and blockpool.ops routes GPU streams to the reference.
//
// NOT BUILT OR RUN IN THIS PROJECT'S CI: Linux cannot compile Metal.
#include <stdexcept>
#include <string>

#include "primitives.h"

namespace blockpool {

void PagedAttention::eval_gpu(const std::vector<mx::array>&, mx::array&) {
  throw std::runtime_error(
      "paged_attention: this build has no GPU kernel; blockpool.ops uses the "
      "pure-MLX reference on GPU streams (see blockpool.ops.backend).");
}

void WriteTokens::eval_gpu(const std::vector<mx::array>&, mx::array&) {
  throw std::runtime_error(
      "write_tokens: this build has no GPU kernel; blockpool.ops uses the "
      "pure-MLX reference on GPU streams (see blockpool.ops.backend).");
}

}  // namespace blockpool
