// Metal kernels for GatherBlocks and ScatterBlocks.
// NOT BUILT OR RUN IN THIS PROJECT'S CI: Linux cannot compile Metal. Built
// only when MLX itself was built with Metal (MLX_BUILD_METAL, macOS).
//
// Elements are moved as unsigned words of the dtype's size, so one kernel per
// size covers every dtype (float16, bfloat16, float32, uint32, ...).
#include <metal_stdlib>

#include "mlx/backend/metal/kernels/bf16.h"

using namespace metal;

// grid: (D * B, num_ids, H). Reads block ids[j] of the pool into
// out[0, h, j*B:(j+1)*B, :]. An id out of range writes zeros, never reads
// outside the pool (the host checks ids before this runs where it can).
template <typename T>
[[kernel]] void gather_blocks(
    device const T* pool [[buffer(0)]],
    device const int* ids [[buffer(1)]],
    device T* out [[buffer(2)]],
    constant const int64_t* pool_strides [[buffer(3)]],
    constant const int& ids_start [[buffer(4)]],
    constant const int& num_ids [[buffer(5)]],
    constant const int& num_blocks [[buffer(6)]],
    constant const int& block_tokens [[buffer(7)]],
    constant const int& dim [[buffer(8)]],
    uint3 gid [[thread_position_in_grid]]) {
  int row = gid.x / dim;
  int e = gid.x % dim;
  int j = gid.y;
  int h = gid.z;
  int64_t o = ((int64_t(h) * num_ids + j) * block_tokens + row) * dim + e;
  int id = ids[ids_start + j];
  if (id < 0 || id >= num_blocks) {
    out[o] = T(0);
    return;
  }
  out[o] = pool[id * pool_strides[0] + h * pool_strides[1] +
                row * pool_strides[2] + e * pool_strides[3]];
}

// grid: (pool size). Copies a possibly strided pool into a contiguous one.
template <typename T>
[[kernel]] void copy_pool(
    device const T* in [[buffer(0)]],
    device T* out [[buffer(1)]],
    constant const int* shape [[buffer(2)]],
    constant const int64_t* strides [[buffer(3)]],
    uint index [[thread_position_in_grid]]) {
  int64_t rest = index;
  int64_t loc = 0;
  for (int d = 3; d >= 0; --d) {
    loc += (rest % shape[d]) * strides[d];
    rest /= shape[d];
  }
  out[index] = in[loc];
}

// grid: (D, T, H). Writes source token t to position first_token + t of the
// entry's blocks in the contiguous output pool. An id out of range is
// skipped: nothing is written outside the pool.
template <typename T>
[[kernel]] void scatter_blocks(
    device const T* src [[buffer(0)]],
    device const int* ids [[buffer(1)]],
    device T* pool [[buffer(2)]],
    constant const int64_t* src_strides [[buffer(3)]],
    constant const int& ids_start [[buffer(4)]],
    constant const int& first_token [[buffer(5)]],
    constant const int& num_blocks [[buffer(6)]],
    constant const int& heads [[buffer(7)]],
    constant const int& block_tokens [[buffer(8)]],
    constant const int& dim [[buffer(9)]],
    uint3 gid [[thread_position_in_grid]]) {
  int e = gid.x;
  int t = gid.y;
  int h = gid.z;
  int pos = first_token + t;
  int id = ids[ids_start + pos / block_tokens];
  if (id < 0 || id >= num_blocks) {
    return;
  }
  int64_t o = ((int64_t(id) * heads + h) * block_tokens + pos % block_tokens) *
          dim + e;
  pool[o] = src[h * src_strides[1] + t * src_strides[2] + e * src_strides[3]];
}

#define instantiate(name, type)                                      \
  template [[host_name("gather_blocks_" #name)]] [[kernel]] void     \
  gather_blocks<type>(device const type*, device const int*,         \
                      device type*, constant const int64_t*,         \
                      constant const int&, constant const int&,      \
                      constant const int&, constant const int&,      \
                      constant const int&, uint3);                   \
  template [[host_name("copy_pool_" #name)]] [[kernel]] void         \
  copy_pool<type>(device const type*, device type*,                  \
                  constant const int*, constant const int64_t*, uint); \
  template [[host_name("scatter_blocks_" #name)]] [[kernel]] void    \
  scatter_blocks<type>(device const type*, device const int*,        \
                       device type*, constant const int64_t*,        \
                       constant const int&, constant const int&,     \
                       constant const int&, constant const int&,     \
                       constant const int&, constant const int&, uint3);

instantiate(1, uint8_t)
instantiate(2, uint16_t)
instantiate(4, uint32_t)
instantiate(8, uint64_t)

// grid: (B * D, num_ids, H). Gathers and dequantizes one element: the
// integer is converted to T, multiplied by the scale, then the bias added.
// Whether this rounds exactly as MLX's own GPU dequantize does has not been
// checked: nothing here has run on a Mac.
template <typename T>
[[kernel]] void gather_dequantize(
    device const uint32_t* packed [[buffer(0)]],
    device const T* scales [[buffer(1)]],
    device const T* biases [[buffer(2)]],
    device const int* ids [[buffer(3)]],
    device T* out [[buffer(4)]],
    constant const int64_t* packed_strides [[buffer(5)]],
    constant const int64_t* scale_strides [[buffer(6)]],
    constant const int& ids_start [[buffer(7)]],
    constant const int& num_ids [[buffer(8)]],
    constant const int& num_blocks [[buffer(9)]],
    constant const int& block_tokens [[buffer(10)]],
    constant const int& dim [[buffer(11)]],
    constant const int& group_size [[buffer(12)]],
    constant const int& bits [[buffer(13)]],
    uint3 gid [[thread_position_in_grid]]) {
  int row = gid.x / dim;
  int e = gid.x % dim;
  int j = gid.y;
  int h = gid.z;
  int64_t o = ((int64_t(h) * num_ids + j) * block_tokens + row) * dim + e;
  int id = ids[ids_start + j];
  if (id < 0 || id >= num_blocks) {
    out[o] = T(0);
    return;
  }
  int per_word = 32 / bits;
  int64_t base = id * packed_strides[0] + h * packed_strides[1] + row * packed_strides[2];
  uint32_t word = packed[base + (e / per_word) * packed_strides[3]];
  uint32_t q = (word >> ((e % per_word) * bits)) & ((1u << bits) - 1u);
  int64_t sbase = id * scale_strides[0] + h * scale_strides[1] + row * scale_strides[2] +
      (e / group_size) * scale_strides[3];
  T scaled = static_cast<T>(q) * scales[sbase];
  out[o] = scaled + biases[sbase];
}

#define instantiate_dequantize(name, type)                                    \
  template [[host_name("gather_dequantize_" #name)]] [[kernel]] void          \
  gather_dequantize<type>(device const uint32_t*, device const type*,         \
                          device const type*, device const int*, device type*, \
                          constant const int64_t*, constant const int64_t*,   \
                          constant const int&, constant const int&,           \
                          constant const int&, constant const int&,           \
                          constant const int&, constant const int&,           \
                          constant const int&, uint3);

instantiate_dequantize(float32, float)
instantiate_dequantize(float16, half)
instantiate_dequantize(bfloat16, bfloat16_t)
