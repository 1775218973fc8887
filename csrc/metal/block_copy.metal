// Metal kernels for GatherBlocks and ScatterBlocks.
// NOT BUILT OR RUN IN THIS PROJECT'S CI: Linux cannot compile Metal. Built
// only when MLX itself was built with Metal (MLX_BUILD_METAL, macOS).
//
// Elements are moved as unsigned words of the dtype's size, so one kernel per
// size covers every dtype (float16, bfloat16, float32, uint32, ...).
#include <metal_stdlib>

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
