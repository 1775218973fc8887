// CPU evaluation of PagedAttention and WriteTokens.
//
// PagedAttention computes, for each query, what MLX's CPU
// scaled_dot_product_attention computes over the same keys, in the same
// steps and with the same roundings, so results are equal bit for bit:
//   1. the query times the scale, both rounded to the dtype;
//   2. each score a dot product summed in order over the head dim in float,
//      rounded to the dtype (as MLX's matmul: reference BLAS for float32,
//      its float-accumulating gemm for float16 and bfloat16);
//   3. softmax in float: the maximum, MLX's exp polynomial, the sum in key
//      order (an attention sink first), one reciprocal, each weight rounded
//      to the dtype;
//   4. the output a sum in key order of weight times value, in float,
//      rounded to the dtype.
// Masked keys (future positions, outside the window) are left out: in MLX
// they become exact zeros, which change no sum. The file is built with
// -ffp-contract=off so no multiply and add fuse into one rounding; the one
// fused step MLX takes (inside its exp) is an explicit fma here too.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "attention_ops.h"
#include "block_index.h"
#include "cpu/execute.h"
#include "cpu/parallel.h"
#include "mlx/allocator.h"
#include "mlx/backend/cpu/encoder.h"
#include "mlx/types/half_types.h"

namespace blockpool {

namespace {

namespace bi = blockpool_index;

// MLX's CPU exp for float (the simd exp of mlx/backend/cpu/simd/math.h,
// a Cephes-style polynomial for 2^x): softmax uses it, so weights match.
inline float mlx_exp(float x_init) {
  if (std::isnan(x_init)) {
    return x_init;
  }
  if (x_init > 88.0f) {
    return INFINITY;
  }
  if (x_init < -88.0f) {
    return 0.0f;
  }
  float x = x_init * 1.442695f;
  float ipart = std::floor(x + 0.5f);
  float fpart = x - ipart;
  x = 1.535336188319500e-4f;
  x = std::fma(x, fpart, 1.339887440266574e-3f);
  x = std::fma(x, fpart, 9.618437357674640e-3f);
  x = std::fma(x, fpart, 5.550332471162809e-2f);
  x = std::fma(x, fpart, 2.402264791363012e-1f);
  x = std::fma(x, fpart, 6.931472028550421e-1f);
  x = std::fma(x, fpart, 1.000000000000000f);
  int32_t bits = (static_cast<int32_t>(ipart) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return scale * x;
}

template <typename T>
inline float rounded(float x) {
  return static_cast<float>(static_cast<T>(x));
}

// One head's row of a block, as floats of the dtype: a plain block row,
// or a quantized one dequantized as mx.dequantize does (round after the
// multiply, round after the add, in the scales' dtype).
template <typename T>
struct BlockReader {
  const std::vector<const T*>* plain;     // per full-precision block
  const std::vector<const uint32_t*>* packed;  // per quantized block
  const std::vector<const T*>* scales;
  const std::vector<const T*>* biases;
  int64_t full_blocks;
  int64_t block_tokens;
  int64_t dim;
  int group_size;
  int bits;

  // Returns the row's values: in place when plain, else written to `tmp`.
  const float* row(int64_t block, int64_t head, int64_t r, float* tmp) const {
    if (block < full_blocks) {
      const T* src =
          (*plain)[block] + bi::block_item(head, r, 0, block_tokens, dim);
      for (int64_t d = 0; d < dim; ++d) {
        tmp[d] = static_cast<float>(src[d]);
      }
      return tmp;
    }
    int64_t q = block - full_blocks;
    int64_t per_word = bi::values_per_word(bits);
    int64_t groups = dim / group_size;
    const uint32_t* words =
        (*packed)[q] + bi::block_item(head, r, 0, block_tokens, dim / per_word);
    const T* s = (*scales)[q] + bi::block_item(head, r, 0, block_tokens, groups);
    const T* b = (*biases)[q] + bi::block_item(head, r, 0, block_tokens, groups);
    for (int64_t d = 0; d < dim; ++d) {
      float scale = static_cast<float>(s[bi::group_of(d, group_size)]);
      float bias = static_cast<float>(b[bi::group_of(d, group_size)]);
      uint32_t v = bi::unpack(words[bi::packed_word(d, bits)], d, bits);
      T scaled = static_cast<T>(static_cast<float>(v) * scale);
      tmp[d] = rounded<T>(static_cast<float>(scaled) + bias);
    }
    return tmp;
  }
};

struct QueryView {
  const char* data;
  int64_t strides[4];  // in items
};

template <typename T>
void attend(const PagedAttentionParams& p, const QueryView& q,
            const T* sinks, const BlockReader<T>& keys,
            const BlockReader<T>& values, int64_t q_heads, int64_t kv_heads,
            int64_t num_queries, int64_t dim, int64_t v_dim, T* out,
            int64_t item_begin, int64_t item_end) {
  const int64_t repeats = q_heads / kv_heads;
  const int64_t bt = p.block_tokens;
  const float scale = rounded<T>(p.scale);
  std::vector<float> qs(repeats * dim), key(dim), value(v_dim);
  std::vector<float> acc(repeats * v_dim), scores;
  const T* qdata = reinterpret_cast<const T*>(q.data);
  for (int64_t item = item_begin; item < item_end; ++item) {
    // item = (row, kv head, query)
    int64_t i = item % num_queries;
    int64_t h = (item / num_queries) % kv_heads;
    int64_t b = item / (num_queries * kv_heads);
    int64_t ring = p.ring_bases.empty() ? -1 : p.ring_bases[b];
    bi::KeyRange range =
        bi::key_range(p.starts[b] + i, p.lengths[b], p.window, ring);
    for (int64_t r = 0; r < repeats; ++r) {
      int64_t hq = h * repeats + r;
      const T* qrow = qdata + b * q.strides[0] + hq * q.strides[1] +
                      i * q.strides[2];
      for (int64_t d = 0; d < dim; ++d) {
        qs[r * dim + d] =
            rounded<T>(static_cast<float>(qrow[d * q.strides[3]]) * scale);
      }
    }
    scores.resize(repeats * range.count);
    const int32_t* table = p.tables.data() + b * p.width;
    for (int64_t k = 0; k < range.count; ++k) {
      int64_t pos = bi::key_position(range, k);
      const float* kr = keys.row(table[pos / bt], h, pos % bt, key.data());
      for (int64_t r = 0; r < repeats; ++r) {
        const float* qr = qs.data() + r * dim;
        float s = 0.0f;
        for (int64_t d = 0; d < dim; ++d) {
          s = s + qr[d] * kr[d];
        }
        s = rounded<T>(s);
        if (p.softcap > 0.0f) {
          s = rounded<T>(p.softcap * std::tanh(s / p.softcap));
        }
        scores[r * range.count + k] = s;
      }
    }
    // Softmax per query head, as MLX's precise softmax over [sink, scores].
    for (int64_t r = 0; r < repeats; ++r) {
      float* sr = scores.data() + r * range.count;
      float sink = sinks ? static_cast<float>(sinks[h * repeats + r]) : 0.0f;
      float m = sinks ? sink : -INFINITY;
      for (int64_t k = 0; k < range.count; ++k) {
        m = std::max(m, sr[k]);
      }
      float total = sinks ? mlx_exp(sink - m) : 0.0f;
      for (int64_t k = 0; k < range.count; ++k) {
        sr[k] = mlx_exp(sr[k] - m);
        total = total + sr[k];
      }
      float norm = 1.0f / total;
      for (int64_t k = 0; k < range.count; ++k) {
        sr[k] = rounded<T>(sr[k] * norm);
      }
    }
    std::fill(acc.begin(), acc.end(), 0.0f);
    for (int64_t k = 0; k < range.count; ++k) {
      int64_t pos = bi::key_position(range, k);
      const float* vr = values.row(table[pos / bt], h, pos % bt, value.data());
      for (int64_t r = 0; r < repeats; ++r) {
        float w = scores[r * range.count + k];
        float* ar = acc.data() + r * v_dim;
        for (int64_t d = 0; d < v_dim; ++d) {
          ar[d] = ar[d] + w * vr[d];
        }
      }
    }
    for (int64_t r = 0; r < repeats; ++r) {
      int64_t hq = h * repeats + r;
      T* o = out + ((b * q_heads + hq) * num_queries + i) * v_dim;
      for (int64_t d = 0; d < v_dim; ++d) {
        o[d] = static_cast<T>(acc[r * v_dim + d]);
      }
    }
  }
}

template <typename T>
void run_paged(const PagedAttentionParams& p, const std::vector<char*>& base,
               const mx::array& queries, int64_t kv, int64_t v_dim, T* out) {
  int64_t rows = queries.shape(0), q_heads = queries.shape(1);
  int64_t num_queries = queries.shape(2), dim = queries.shape(3);
  int next = 1;
  const T* sinks = nullptr;
  if (p.has_sinks) {
    sinks = reinterpret_cast<const T*>(base[next++]);
  }
  std::vector<const T*> kplain, vplain, kscales, kbiases, vscales, vbiases;
  std::vector<const uint32_t*> kpacked, vpacked;
  for (int64_t i = 0; i < p.full_blocks; ++i) {
    kplain.push_back(reinterpret_cast<const T*>(base[next++]));
    vplain.push_back(reinterpret_cast<const T*>(base[next++]));
  }
  for (int64_t i = 0; i < p.quantized_blocks; ++i) {
    kpacked.push_back(reinterpret_cast<const uint32_t*>(base[next++]));
    kscales.push_back(reinterpret_cast<const T*>(base[next++]));
    kbiases.push_back(reinterpret_cast<const T*>(base[next++]));
    vpacked.push_back(reinterpret_cast<const uint32_t*>(base[next++]));
    vscales.push_back(reinterpret_cast<const T*>(base[next++]));
    vbiases.push_back(reinterpret_cast<const T*>(base[next++]));
  }
  BlockReader<T> keys{&kplain, &kpacked, &kscales, &kbiases, p.full_blocks,
                      p.block_tokens, dim, p.group_size, p.bits};
  BlockReader<T> values{&vplain, &vpacked, &vscales, &vbiases, p.full_blocks,
                        p.block_tokens, v_dim, p.group_size, p.bits};
  QueryView q{base[0], {queries.strides(0), queries.strides(1),
                        queries.strides(2), queries.strides(3)}};
  int64_t items = rows * kv * num_queries;
  int64_t longest = 1;
  for (auto len : p.lengths) {
    longest = std::max<int64_t>(longest, len);
  }
  int64_t window = p.window > 0 ? std::min<int64_t>(p.window, longest) : longest;
  int64_t bytes_per_item = window * (dim + v_dim) * q_heads / kv * 4;
  cpu::parallel_for(items, bytes_per_item, [&](int64_t begin, int64_t end) {
    attend<T>(p, q, sinks, keys, values, q_heads, kv, num_queries, dim, v_dim,
              out, begin, end);
  });
}

}  // namespace

void PagedAttention::eval_cpu(const std::vector<mx::array>& inputs,
                              mx::array& out) {
  auto& encoder = mx::cpu::get_command_encoder(stream());
  for (const auto& a : inputs) {
    encoder.set_input_array(a);
  }
  out.set_data(mx::allocator::malloc(out.nbytes()));
  encoder.set_output_array(out);
  std::vector<mx::array> outputs{out};
  // Blocks are made by this package (split, write, quantize): contiguous.
  for (size_t i = 1; i < inputs.size(); ++i) {
    if (!inputs[i].flags().row_contiguous) {
      throw std::runtime_error(
          "paged_attention: block arrays must be row-contiguous.");
    }
  }
  int64_t kv_heads = inputs[params_.has_sinks ? 2 : 1].shape(0);
  encoder.dispatch([params = params_, base = cpu::base_pointers(inputs, outputs),
                    queries = inputs[0], kv_heads, v_dim = out.shape(3),
                    dtype = out.dtype(), out_ptr = out.data<char>()]() {
    if (dtype == mx::float32) {
      run_paged<float>(params, base, queries, kv_heads, v_dim,
                       reinterpret_cast<float*>(out_ptr));
    } else if (dtype == mx::float16) {
      run_paged<mx::float16_t>(params, base, queries, kv_heads, v_dim,
                               reinterpret_cast<mx::float16_t*>(out_ptr));
    } else {
      run_paged<mx::bfloat16_t>(params, base, queries, kv_heads, v_dim,
                                reinterpret_cast<mx::bfloat16_t*>(out_ptr));
    }
  });
}

void WriteTokens::eval_cpu(const std::vector<mx::array>& inputs,
                           mx::array& out) {
  auto& encoder = mx::cpu::get_command_encoder(stream());
  for (const auto& a : inputs) {
    encoder.set_input_array(a);
  }
  const auto& p = params_;
  bool donated = adopt_or_allocate(p.has_dest ? &inputs[1] : nullptr, out);
  encoder.set_output_array(out);
  if (p.has_dest && !donated) {
    record_copied_write();
  }
  std::vector<mx::array> outputs{out};
  auto plan = plan_write_tokens(layouts_of(inputs, outputs),
                                static_cast<int>(inputs.size()), p, donated);
  encoder.dispatch([plan = std::move(plan),
                    base = cpu::base_pointers(inputs, outputs)]() {
    cpu::run_copy_plan(plan, base);
  });
}

}  // namespace blockpool
