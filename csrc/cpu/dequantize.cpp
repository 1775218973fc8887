// CPU evaluation of GatherDequantizeBlocks and ConcatDequantizeBlocks.
//
// Each element is computed as mx.dequantize computes it on the CPU: the
// unpacked integer is converted to the scales' type, multiplied by the scale
// (rounded to that type), then the bias is added (rounded again), using
// MLX's own half-precision types. The file is built with -ffp-contract=off
// so no compiler fuses the two steps into one rounding. Every entry uses
// its own output dtype (its scales' dtype), so one call may mix them.
#include <type_traits>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "block_index.h"
#include "cpu/execute.h"
#include "cpu/parallel.h"

namespace blockpool {

namespace {

namespace bi = blockpool_index;

// MLX's own conversions: T(float) rounds to nearest even, float(T) is exact.
template <typename T>
inline float to_float(T x) {
  return static_cast<float>(x);
}

// One element: round(round(q * scale) + bias) in T, as mx.dequantize does
// with separate multiply and add ops. q * scale is exact in float.
template <typename T>
inline T dequantize_one(uint32_t q, float scale, float bias) {
  T scaled = static_cast<T>(static_cast<float>(q) * scale);
  return static_cast<T>(to_float(scaled) + bias);
}

// A row of `dim` outputs; packed words, scales and biases may each be
// strided. A word never spans two groups: group_size is a multiple of the
// values per word.
template <typename T, int bits>
void dequantize_row(const uint32_t* packed, int64_t word_stride,
                    const T* scales, int64_t scale_stride, const T* biases,
                    int64_t bias_stride, int64_t dim, int group_size, T* out) {
  constexpr int per_word = 32 / bits;
  for (int64_t g = 0; g < dim / group_size; ++g) {
    float scale = to_float(scales[g * scale_stride]);
    float bias = to_float(biases[g * bias_stride]);
    for (int64_t first = g * group_size; first < (g + 1) * group_size;
         first += per_word) {
      uint32_t word = packed[bi::packed_word(first, bits) * word_stride];
      for (int k = 0; k < per_word; ++k) {
        out[first + k] = dequantize_one<T>(bi::unpack(word, first + k, bits),
                                           scale, bias);
      }
    }
  }
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define BLOCKPOOL_AVX2 1
// x86 has no native half arithmetic: MLX converts float16 and bfloat16 in
// scalar software, which dominates the cost. These paths do 8 values at a
// time with the same round-to-nearest-even (F16C for float16, the same
// integer rounding as MLX's bfloat16 type, NaN included), so results are
// bit-identical. Contiguous rows, 4 or 8 bits; chosen at run time when the
// CPU has AVX2 and F16C.
enum class Out { F32, F16, BF16 };

template <Out kind>
__attribute__((target("avx2,f16c"))) inline __m256 load_half(uint16_t bits) {
  if constexpr (kind == Out::F16) {
    return _mm256_set1_ps(_cvtsh_ss(bits));
  } else {
    return _mm256_castsi256_ps(_mm256_set1_epi32(static_cast<int>(bits) << 16));
  }
}

// Rounds 8 floats to the output type: the 16-bit results in the low half of
// each 32-bit lane, or the float itself.
template <Out kind>
__attribute__((target("avx2,f16c"))) inline __m256i round_to(__m256 v) {
  if constexpr (kind == Out::F16) {
    return _mm256_cvtepu16_epi32(_mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  } else if constexpr (kind == Out::BF16) {
    __m256i u = _mm256_castps_si256(v);
    __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
    __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    return _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), nan);
  } else {
    return _mm256_castps_si256(v);
  }
}

template <Out kind>
__attribute__((target("avx2,f16c"))) inline __m256 widen(__m256i r) {
  if constexpr (kind == Out::F16) {
    __m128i packed = _mm256_castsi256_si128(_mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08));
    return _mm256_cvtph_ps(packed);
  } else if constexpr (kind == Out::BF16) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(r, 16));
  } else {
    return _mm256_castsi256_ps(r);
  }
}

template <Out kind>
__attribute__((target("avx2,f16c"))) void dequantize_row_avx2(
    const uint32_t* packed, const void* scales, const void* biases, int dim,
    int group_size, int bits, void* out) {
  const __m256i shifts4 = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
  const __m256i mask4 = _mm256_set1_epi32(0xF);
  for (int g = 0; g < dim / group_size; ++g) {
    __m256 scale, bias;
    if constexpr (kind == Out::F32) {
      scale = _mm256_set1_ps(static_cast<const float*>(scales)[g]);
      bias = _mm256_set1_ps(static_cast<const float*>(biases)[g]);
    } else {
      scale = load_half<kind>(static_cast<const uint16_t*>(scales)[g]);
      bias = load_half<kind>(static_cast<const uint16_t*>(biases)[g]);
    }
    for (int e = g * group_size; e < (g + 1) * group_size; e += 8) {
      __m256i q;
      if (bits == 8) {  // 8 bytes: two words
        q = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(packed + bi::packed_word(e, 8))));
      } else {  // 8 nibbles: one word
        q = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(packed[bi::packed_word(e, 4)]), shifts4), mask4);
      }
      __m256 scaled = widen<kind>(round_to<kind>(_mm256_mul_ps(_mm256_cvtepi32_ps(q), scale)));
      __m256i result = round_to<kind>(_mm256_add_ps(scaled, bias));
      if constexpr (kind == Out::F32) {
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(static_cast<float*>(out) + e), result);
      } else {
        __m128i halves = _mm256_castsi256_si128(_mm256_permute4x64_epi64(_mm256_packus_epi32(result, result), 0x08));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(static_cast<uint16_t*>(out) + e), halves);
      }
    }
  }
}

bool has_avx2() {
  static const bool yes = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
  return yes;
}
#endif

// One head of one segment: `rows` rows of `dim` values.
template <typename T>
void dequantize_head(const DequantSegment& s, int64_t h,
                     const std::vector<char*>& base, int group_size,
                     int bits) {
  auto packed = reinterpret_cast<const uint32_t*>(base[s.packed]);
  auto scales = reinterpret_cast<const T*>(base[s.scales]);
  auto biases = reinterpret_cast<const T*>(base[s.biases]);
  auto out = reinterpret_cast<T*>(base[s.out]);
#ifdef BLOCKPOOL_AVX2
  const bool fast = has_avx2() && (bits == 4 || bits == 8) &&
                    s.packed_word_stride == 1 && s.scales_group_stride == 1 &&
                    s.biases_group_stride == 1;
#endif
  for (int64_t r = 0; r < s.rows; ++r) {
    const uint32_t* q = packed + bi::dequant_word_index(s, h, r, 0);
    const T* sc = scales + bi::dequant_scale_index(s, h, r, 0);
    const T* bs = biases + bi::dequant_bias_index(s, h, r, 0);
    T* o = out + bi::dequant_out_index(s, h, r, 0);
#ifdef BLOCKPOOL_AVX2
    if (fast) {
      constexpr Out kind = std::is_same_v<T, float>          ? Out::F32
                           : std::is_same_v<T, mx::float16_t> ? Out::F16
                                                              : Out::BF16;
      dequantize_row_avx2<kind>(q, sc, bs, static_cast<int>(s.dim), group_size,
                                bits, o);
      continue;
    }
#endif
    switch (bits) {
      case 2:
        dequantize_row<T, 2>(q, s.packed_word_stride, sc, s.scales_group_stride,
                             bs, s.biases_group_stride, s.dim, group_size, o);
        break;
      case 4:
        dequantize_row<T, 4>(q, s.packed_word_stride, sc, s.scales_group_stride,
                             bs, s.biases_group_stride, s.dim, group_size, o);
        break;
      default:
        dequantize_row<T, 8>(q, s.packed_word_stride, sc, s.scales_group_stride,
                             bs, s.biases_group_stride, s.dim, group_size, o);
        break;
    }
  }
}

}  // namespace

namespace cpu {

void run_dequant_plan(const std::vector<DequantSegment>& segments,
                      const std::vector<char*>& base,
                      const std::vector<Layout>& slots, int group_size,
                      int bits) {
  // One work item per (segment, head).
  struct Item {
    size_t segment;
    int64_t head;
  };
  std::vector<Item> items;
  for (size_t i = 0; i < segments.size(); ++i) {
    for (int64_t h = 0; h < segments[i].heads; ++h) {
      items.push_back({i, h});
    }
  }
  if (items.empty()) {
    return;
  }
  const auto& first = segments[items[0].segment];
  int64_t bytes_per_item =
      first.rows * first.dim * slots[first.out].itemsize;
  parallel_for(
      static_cast<int64_t>(items.size()), bytes_per_item,
      [&](int64_t begin, int64_t end) {
        for (int64_t n = begin; n < end; ++n) {
          const auto& s = segments[items[n].segment];
          auto dtype = slots[s.out].dtype;
          if (dtype == mx::float16) {
            dequantize_head<mx::float16_t>(s, items[n].head, base, group_size, bits);
          } else if (dtype == mx::bfloat16) {
            dequantize_head<mx::bfloat16_t>(s, items[n].head, base, group_size, bits);
          } else {
            dequantize_head<float>(s, items[n].head, base, group_size, bits);
          }
        }
      });
}

}  // namespace cpu

void GatherDequantizeBlocks::eval_cpu(const std::vector<mx::array>& inputs,
                                      std::vector<mx::array>& outputs) {
  auto& encoder = cpu::encode_io(stream(), inputs, outputs);
  encoder.dispatch(
      [slots = layouts_of(inputs, outputs),
       base = cpu::base_pointers(inputs, outputs),
       traced = cpu::traced_ids(params_.entries, inputs, "gather_dequantize_blocks"),
       num_inputs = static_cast<int>(inputs.size()), entries = params_.entries,
       host = params_.host_ids, group_size = params_.group_size, bits = params_.bits]() {
        auto ids = id_spans(entries, host, traced);
        cpu::run_dequant_plan(
            plan_gather_dequantize(slots, num_inputs, entries, ids, group_size, bits),
            base, slots, group_size, bits);
      });
}

void ConcatDequantizeBlocks::eval_cpu(const std::vector<mx::array>& inputs,
                                      std::vector<mx::array>& outputs) {
  auto& encoder = cpu::encode_io(stream(), inputs, outputs);
  encoder.dispatch([slots = layouts_of(inputs, outputs),
                    base = cpu::base_pointers(inputs, outputs),
                    num_inputs = static_cast<int>(inputs.size()),
                    entries = params_.entries, block_inputs = params_.block_inputs,
                    group_size = params_.group_size, bits = params_.bits]() {
    cpu::run_dequant_plan(
        plan_concat_dequantize(slots, num_inputs, entries, block_inputs, group_size, bits),
        base, slots, group_size, bits);
  });
}

}  // namespace blockpool
