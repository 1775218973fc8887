// Metal kernels of paged attention: attention over K/V read in place from
// per-block arrays. The host (metal/paged_attention.cpp) binds the blocks a
// dispatch reads (at most 29 arrays: see dispatch.h); each dispatch writes a
// partial softmax per query (paged_partial), and one merge combines them
// (paged_merge), as flash-decoding combines key splits. The keys a query
// attends to, and where each one is, come from csrc/block_index.h, the
// formulas the CPU kernel (cpu/paged_attention.cpp) uses too.
//
// NOT BUILT OR RUN IN THIS PROJECT'S CI: Linux cannot compile Metal. Built
// only where the configure-time check in CMakeLists.txt compiled it. The GPU
// result is not bit-identical to MLX's GPU attention (another summation
// order); blockpool.ops checks it against the pure-MLX reference, within a
// tolerance, on its first GPU use, and falls back to the reference if it
// differs.
#include <metal_stdlib>

#include "block_index.h"
#include "mlx/backend/metal/kernels/bf16.h"

using namespace metal;
using namespace blockpool_index;

#include "metal/bound_buffers.h"

// Head dims up to 32 * kPerLane.
constexpr constant int kPerLane = 8;

// One simdgroup per query (grid: 32 x items): lanes split the head dim,
// keys are taken one after another with an online softmax. Buffers: table
// [[0]], params [[1]]; arrays: b0 queries, b1 partial results (float), then
// per bound block its keys and values (full precision), or its packed,
// scales and biases for keys and then for values (quantized).
template <typename T>
[[kernel]] void paged_partial(
    device const int32_t* table [[buffer(0)]],
    constant const PagedDispatch& p [[buffer(1)]],
    BLOCKPOOL_BUFFERS,
    uint3 gid [[thread_position_in_grid]],
    uint lane [[thread_index_in_simdgroup]]) {
  int64_t items = int64_t(p.rows) * p.q_heads * p.queries;
  int64_t item = gid.y;
  if (item >= items) {
    return;
  }
  int64_t i = item % p.queries;
  int64_t hq = (item / p.queries) % p.q_heads;
  int64_t b = item / (int64_t(p.queries) * p.q_heads);
  int64_t h = hq / (p.q_heads / p.kv_heads);
  device const int32_t* blocks = table + b * p.width;
  device const int32_t* lengths = table + int64_t(p.rows) * p.width;
  device const int32_t* starts = lengths + p.rows;
  // On the GPU the sum order need not follow mlx-lm's ring: time order.
  KeyRange range = key_range(starts[b] + i, lengths[b], p.window, -1);

  device const T* q = reinterpret_cast<device const T*>(BOUND(0)) +
      b * p.query_strides[0] + hq * p.query_strides[1] + i * p.query_strides[2];
  float qs[kPerLane];
  for (int j = 0; j < kPerLane; ++j) {
    int64_t e = int64_t(lane) + 32 * j;
    qs[j] = e < p.dim ? float(q[e * p.query_strides[3]]) * p.scale : 0.0f;
  }
  float m = -INFINITY;
  float l = 0.0f;
  float acc[kPerLane];
  for (int j = 0; j < kPerLane; ++j) {
    acc[j] = 0.0f;
  }
  int planes = p.bits ? 6 : 2;
  int64_t per_word = p.bits ? values_per_word(p.bits) : 1;
  for (int64_t k = 0; k < range.count; ++k) {
    int64_t pos = key_position(range, k);
    int32_t slot = blocks[pos / p.block_tokens];
    if (slot < 0) {
      continue;  // in a block another dispatch reads
    }
    int64_t row = pos % p.block_tokens;
    int first = 2 + slot * planes;
    float kv[kPerLane];  // this lane's key items, then its value items
    for (int j = 0; j < kPerLane; ++j) {
      int64_t e = int64_t(lane) + 32 * j;
      kv[j] = 0.0f;
      if (e >= p.dim) {
        continue;
      }
      if (p.bits) {
        int64_t groups = p.dim / p.group_size;
        uint32_t word = reinterpret_cast<device const uint32_t*>(BOUND(first))
            [block_item(h, row, packed_word(e, p.bits), p.block_tokens, p.dim / per_word)];
        T scale = reinterpret_cast<device const T*>(BOUND(first + 1))
            [block_item(h, row, group_of(e, p.group_size), p.block_tokens, groups)];
        T bias = reinterpret_cast<device const T*>(BOUND(first + 2))
            [block_item(h, row, group_of(e, p.group_size), p.block_tokens, groups)];
        kv[j] = float(T(scale * T(float(unpack(word, e, p.bits))) + bias));
      } else {
        kv[j] = float(reinterpret_cast<device const T*>(BOUND(first))
            [block_item(h, row, e, p.block_tokens, p.dim)]);
      }
    }
    float s = 0.0f;
    for (int j = 0; j < kPerLane; ++j) {
      s += qs[j] * kv[j];
    }
    s = simd_sum(s);
    if (p.softcap > 0.0f) {
      s = p.softcap * tanh(s / p.softcap);
    }
    float m_new = max(m, s);
    float keep = exp(m - m_new);
    float weight = exp(s - m_new);
    l = l * keep + weight;
    m = m_new;
    for (int j = 0; j < kPerLane; ++j) {
      int64_t e = int64_t(lane) + 32 * j;
      float v = 0.0f;
      if (e < p.v_dim) {
        if (p.bits) {
          int64_t groups = p.v_dim / p.group_size;
          uint32_t word = reinterpret_cast<device const uint32_t*>(BOUND(first + 3))
              [block_item(h, row, packed_word(e, p.bits), p.block_tokens, p.v_dim / per_word)];
          T scale = reinterpret_cast<device const T*>(BOUND(first + 4))
              [block_item(h, row, group_of(e, p.group_size), p.block_tokens, groups)];
          T bias = reinterpret_cast<device const T*>(BOUND(first + 5))
              [block_item(h, row, group_of(e, p.group_size), p.block_tokens, groups)];
          v = float(T(scale * T(float(unpack(word, e, p.bits))) + bias));
        } else {
          v = float(reinterpret_cast<device const T*>(BOUND(first + 1))
              [block_item(h, row, e, p.block_tokens, p.v_dim)]);
        }
      }
      acc[j] = acc[j] * keep + weight * v;
    }
  }
  device float* out = reinterpret_cast<device float*>(BOUND(1)) +
      partial_offset(p.part, item, items, p.v_dim);
  if (lane == 0) {
    out[0] = m;
    out[1] = l;
  }
  for (int j = 0; j < kPerLane; ++j) {
    int64_t e = int64_t(lane) + 32 * j;
    if (e < p.v_dim) {
      out[2 + e] = acc[j];
    }
  }
}

// One thread per output item (grid: v_dim x items): the parts' softmaxes
// merged, with the attention sink (one logit per head, no value) as one
// more part. Arrays: b0 partial results, b1 the output, b2 the sinks.
template <typename T>
[[kernel]] void paged_merge(
    device const int32_t* table [[buffer(0)]],
    constant const PagedDispatch& p [[buffer(1)]],
    BLOCKPOOL_BUFFERS,
    uint3 gid [[thread_position_in_grid]]) {
  int64_t items = int64_t(p.rows) * p.q_heads * p.queries;
  int64_t e = gid.x;
  int64_t item = gid.y;
  if (e >= p.v_dim || item >= items) {
    return;
  }
  device const float* parts = reinterpret_cast<device const float*>(BOUND(0));
  float m = -INFINITY;
  for (int32_t part = 0; part < p.parts; ++part) {
    m = max(m, parts[partial_offset(part, item, items, p.v_dim)]);
  }
  float sink = -INFINITY;
  if (p.has_sinks) {
    int64_t hq = (item / p.queries) % p.q_heads;
    sink = float(reinterpret_cast<device const T*>(BOUND(2))[hq]);
    m = max(m, sink);
  }
  float total = p.has_sinks ? exp(sink - m) : 0.0f;
  float value = 0.0f;
  for (int32_t part = 0; part < p.parts; ++part) {
    device const float* r = parts + partial_offset(part, item, items, p.v_dim);
    float w = r[1] > 0.0f ? exp(r[0] - m) : 0.0f;
    total += r[1] * w;
    value += r[2 + e] * w;
  }
  reinterpret_cast<device T*>(BOUND(1))[item * p.v_dim + e] =
      T(total > 0.0f ? value / total : 0.0f);
}

#define instantiate_paged(name, type)                                    \
  template [[host_name("paged_partial_" #name)]] [[kernel]] void         \
  paged_partial<type>(device const int32_t*, constant const PagedDispatch&, \
                      BLOCKPOOL_BUFFER_TYPES, uint3, uint);                \
  template [[host_name("paged_merge_" #name)]] [[kernel]] void           \
  paged_merge<type>(device const int32_t*, constant const PagedDispatch&,   \
                    BLOCKPOOL_BUFFER_TYPES, uint3);

instantiate_paged(float32, float)
instantiate_paged(float16, half)
instantiate_paged(bfloat16, bfloat16_t)
