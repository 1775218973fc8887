// Metal kernels for every block op: they walk the plans built on the host
// (csrc/plans.cpp) with the index formulas the CPU kernels also use
// (csrc/block_index.h, which compiles as C++ and as Metal Shading Language).
//
// NOT BUILT OR RUN IN THIS PROJECT'S CI: Linux cannot compile Metal. Built
// only where the configure-time check in CMakeLists.txt compiled it (macOS
// with an mlx built with Metal). blockpool.ops checks each op against the
// pure-MLX reference on its first GPU use and falls back if it differs.
// The arrays of a dispatch are bound as buffers 2 to 30 (metal/bound_buffers.h).
#include <metal_stdlib>

#include "block_index.h"
#include "mlx/backend/metal/kernels/bf16.h"

using namespace metal;
using namespace blockpool_index;

#include "metal/bound_buffers.h"

// grid: (units per row, heads * rows, segments). Each thread moves one unit
// U (1 to 16 bytes: the host picks the widest that every offset and stride
// of the segment allows) from a segment's source to its destination, or
// writes zeros where the segment has no source.
template <typename U>
[[kernel]] void copy_segments(
    device const CopySegment* segments [[buffer(0)]],
    constant const int& count [[buffer(1)]],
    BLOCKPOOL_BUFFERS,
    uint3 gid [[thread_position_in_grid]]) {
  if (int(gid.z) >= count) {
    return;
  }
  CopySegment s = segments[gid.z];
  int64_t item = gid.x;
  int64_t head_row = gid.y;
  if (item >= s.items || head_row >= s.heads * s.rows) {
    return;
  }
  int64_t head = head_row / s.rows;
  int64_t row = head_row % s.rows;
  device U* dst = reinterpret_cast<device U*>(BOUND(s.dst)) +
      segment_dst_index(s, head, row, item);
  if (s.src < 0) {
    *dst = U(0);
    return;
  }
  device const U* src = reinterpret_cast<device const U*>(BOUND(s.src));
  *dst = src[segment_src_index(s, head, row, item)];
}

#define instantiate_copy(unit, type)                                  \
  template [[host_name("copy_segments_" #unit)]] [[kernel]] void      \
  copy_segments<type>(device const CopySegment*, constant const int&, \
                      BLOCKPOOL_BUFFER_TYPES, uint3);

instantiate_copy(1, uchar)
instantiate_copy(2, ushort)
instantiate_copy(4, uint)
instantiate_copy(8, uint2)
instantiate_copy(16, uint4)

// grid: (packed words per row, heads * rows, segments). Each thread unpacks
// one word into 32 / bits values (16 bytes of float16 at 4 bits) and writes
// each as MLX's affine_dequantize kernel does: scale * q + bias in T, with
// q an 8-bit integer, compiled with the same -fno-fast-math as MLX's own
// kernels. Whether that rounds bit-identically to MLX's GPU dequantize has
// not been checked on a Mac; the first-use self-check compares them.
template <typename T>
[[kernel]] void dequant_segments(
    device const DequantSegment* segments [[buffer(0)]],
    constant const DequantParams& p [[buffer(1)]],
    BLOCKPOOL_BUFFERS,
    uint3 gid [[thread_position_in_grid]]) {
  if (int(gid.z) >= p.count) {
    return;
  }
  DequantSegment s = segments[gid.z];
  int per_word = values_per_word(p.bits);
  int64_t word = gid.x;
  int64_t head_row = gid.y;
  if (word * per_word >= s.dim || head_row >= s.heads * s.rows) {
    return;
  }
  int64_t head = head_row / s.rows;
  int64_t row = head_row % s.rows;
  int64_t first = word * per_word;
  int64_t group = group_of(first, p.group_size);
  uint32_t packed = reinterpret_cast<device const uint32_t*>(BOUND(s.packed))
      [dequant_word_index(s, head, row, word)];
  T scale = reinterpret_cast<device const T*>(BOUND(s.scales))
      [dequant_scale_index(s, head, row, group)];
  T bias = reinterpret_cast<device const T*>(BOUND(s.biases))
      [dequant_bias_index(s, head, row, group)];
  device T* out = reinterpret_cast<device T*>(BOUND(s.out)) +
      dequant_out_index(s, head, row, first);
  for (int k = 0; k < per_word; ++k) {
    uint8_t q = uint8_t(unpack(packed, first + k, p.bits));
    out[k] = scale * q + bias;
  }
}

#define instantiate_dequant(name, type)                             \
  template [[host_name("dequant_segments_" #name)]] [[kernel]] void \
  dequant_segments<type>(device const DequantSegment*,              \
                         constant const DequantParams&,             \
                         BLOCKPOOL_BUFFER_TYPES, uint3);

instantiate_dequant(float32, float)
instantiate_dequant(float16, half)
instantiate_dequant(bfloat16, bfloat16_t)
