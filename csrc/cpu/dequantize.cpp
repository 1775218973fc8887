// CPU evaluation of GatherDequantizeBlocks.
//
// Each element is computed as mx.dequantize computes it on the CPU: the
// unpacked integer is converted to the scales' type, multiplied by the scale
// (rounded to that type), then the bias is added (rounded again), using
// MLX's own half-precision types. The file is built with -ffp-contract=off
// so no compiler fuses the two steps into one rounding.
#include <sstream>
#include <stdexcept>
#include <type_traits>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "block_ops.h"
#include "cpu/parallel.h"
#include "mlx/allocator.h"
#include "mlx/backend/cpu/encoder.h"

namespace blockpool {

namespace {

struct Plane {
  const char* data;
  mx::Shape shape;
  mx::Strides strides;
};

Plane plane_of(const mx::array& a) {
  return {a.data<char>(), a.shape(), a.strides()};
}

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

// A row of `dim` outputs; packed words and groups may be strided.
template <typename T>
void dequantize_row(const uint32_t* packed, int64_t packed_stride,
                    const T* scales, const T* biases, int64_t group_stride,
                    int dim, int group_size, int bits, T* out) {
  const uint32_t mask = (1u << bits) - 1;
  const int per_word = 32 / bits;
  const int words_per_group = group_size / per_word;
  for (int g = 0; g < dim / group_size; ++g) {
    float scale = to_float(scales[g * group_stride]);
    float bias = to_float(biases[g * group_stride]);
    for (int w = 0; w < words_per_group; ++w) {
      uint32_t word = packed[(g * words_per_group + w) * packed_stride];
      T* o = out + (g * words_per_group + w) * per_word;
      for (int k = 0; k < per_word; ++k) {
        o[k] = dequantize_one<T>((word >> (k * bits)) & mask, scale, bias);
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
        q = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(packed + e / 4)));
      } else {  // 8 nibbles: one word
        q = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(packed[e / 8]), shifts4), mask4);
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

template <typename T>
void run(const std::vector<BlockEntry>& entries, const int32_t* ids,
         const std::vector<Plane>& packed, const std::vector<Plane>& scales,
         const std::vector<Plane>& biases, const std::vector<char*>& outs,
         int group_size, int bits) {
  // One work item per (entry, head, block): B rows of D outputs.
  struct Item {
    size_t entry;
    int64_t head;
    int64_t block;
  };
  std::vector<Item> items;
  for (size_t i = 0; i < entries.size(); ++i) {
    for (int64_t h = 0; h < packed[entries[i].pool].shape[1]; ++h) {
      for (int64_t j = 0; j < entries[i].num_ids; ++j) {
        items.push_back({i, h, j});
      }
    }
  }
  if (items.empty()) {
    return;
  }
#ifdef BLOCKPOOL_AVX2
  const bool fast = has_avx2() && (bits == 4 || bits == 8);
#endif
  const auto& first = packed[entries[items[0].entry].pool];
  int64_t bytes_per_item = first.shape[2] * first.shape[3] * 32 / bits * sizeof(T);
  cpu::parallel_for(
      static_cast<int64_t>(items.size()), bytes_per_item,
      [&](int64_t begin, int64_t end) {
        for (int64_t n = begin; n < end; ++n) {
          const auto& it = items[n];
          const auto& e = entries[it.entry];
          const auto& q = packed[e.pool];
          const auto& s = scales[e.pool];
          const auto& b = biases[e.pool];
          int64_t block = q.shape[2];
          int dim = static_cast<int>(q.shape[3] * 32 / bits);
          int64_t id = ids[e.ids_start + it.block];
          T* out = reinterpret_cast<T*>(outs[it.entry]) +
                   ((it.head * e.num_ids + it.block) * block) * dim;
          for (int64_t r = 0; r < block; ++r) {
            auto q_row = reinterpret_cast<const uint32_t*>(q.data) +
                         id * q.strides[0] + it.head * q.strides[1] + r * q.strides[2];
            auto s_row = reinterpret_cast<const T*>(s.data) +
                         id * s.strides[0] + it.head * s.strides[1] + r * s.strides[2];
            auto b_row = reinterpret_cast<const T*>(b.data) +
                         id * b.strides[0] + it.head * b.strides[1] + r * b.strides[2];
#ifdef BLOCKPOOL_AVX2
            if (fast && q.strides[3] == 1 && s.strides[3] == 1) {
              constexpr Out kind = std::is_same_v<T, float>          ? Out::F32
                                   : std::is_same_v<T, mx::float16_t> ? Out::F16
                                                                      : Out::BF16;
              dequantize_row_avx2<kind>(q_row, s_row, b_row, dim, group_size, bits, out + r * dim);
              continue;
            }
#endif
            dequantize_row<T>(q_row, q.strides[3], s_row, b_row, s.strides[3],
                              dim, group_size, bits, out + r * dim);
          }
        }
      });
}

}  // namespace

void GatherDequantizeBlocks::eval_cpu(const std::vector<mx::array>& inputs,
                                      std::vector<mx::array>& outputs) {
  int n = (static_cast<int>(inputs.size()) - 1) / 3;
  auto& encoder = mx::cpu::get_command_encoder(stream());
  std::vector<Plane> packed, scales, biases;
  std::vector<int64_t> num_blocks;
  for (int p = 0; p < n; ++p) {
    for (int k = 0; k < 3; ++k) {
      encoder.set_input_array(inputs[k * n + p]);
    }
    if (inputs[n + p].strides(3) != inputs[2 * n + p].strides(3)) {
      throw std::invalid_argument(
          "gather_dequantize_blocks: scales and biases must have the same layout.");
    }
    packed.push_back(plane_of(inputs[p]));
    scales.push_back(plane_of(inputs[n + p]));
    biases.push_back(plane_of(inputs[2 * n + p]));
    num_blocks.push_back(inputs[p].shape(0));
  }
  const auto& ids = inputs[3 * n];
  encoder.set_input_array(ids);
  std::vector<char*> outs;
  for (auto& out : outputs) {
    out.set_data(mx::allocator::malloc(out.nbytes()));
    encoder.set_output_array(out);
    outs.push_back(out.data<char>());
  }
  auto dtype = outputs.empty() ? mx::float32 : outputs[0].dtype();
  encoder.dispatch([ids = ids.data<int32_t>(), entries = entries_,
                    packed = std::move(packed), scales = std::move(scales),
                    biases = std::move(biases), outs = std::move(outs),
                    num_blocks = std::move(num_blocks), dtype,
                    group_size = group_size_, bits = bits_]() {
    for (const auto& e : entries) {
      for (int64_t k = 0; k < e.num_ids; ++k) {
        int64_t id = ids[e.ids_start + k];
        if (id < 0 || id >= num_blocks[e.pool]) {
          std::ostringstream os;
          os << "gather_dequantize_blocks: block id " << id
             << " is out of range for a pool of " << num_blocks[e.pool] << " blocks.";
          throw std::out_of_range(os.str());
        }
      }
    }
    if (dtype == mx::float16) {
      run<mx::float16_t>(entries, ids, packed, scales, biases, outs, group_size, bits);
    } else if (dtype == mx::bfloat16) {
      run<mx::bfloat16_t>(entries, ids, packed, scales, biases, outs, group_size, bits);
    } else {
      run<float>(entries, ids, packed, scales, biases, outs, group_size, bits);
    }
  });
}

}  // namespace blockpool
