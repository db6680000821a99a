// y = x @ w for XLA:CPU with w packed as 4- or 8-bit group-wise integers (jpaged/models/packed.py),
// dequantized in registers, accumulated in float32. Called from jax through the XLA FFI.
//
//   x       [M, K]            float32 activations, row-major
//   panels  [P, X]            one row per panel of 32 columns: its integers, scales and minimums
//                             back to back, so a panel streams from one place (and a step passes
//                             one array per projection, not three: jax's dispatch costs per array):
//     q       [K * bits / 32, 32] uint32: word [o, c] holds column c's integers for k = o * per + i,
//                             i < per = 32 / bits, the i-th in bits [bits * i, bits * (i + 1))
//     scales  [K / G, 32]     float32 (panels uint32) or float16 (panels uint16), a group's 32
//                             columns contiguous
//     mins    [K / G, 32]     the scales' type; absent for a symmetric format, whose minimums
//                             are -2^(bits-1) * scale
//   y       [M, N]            P = ceil(N / 32); columns past N have zero scale and minimum
//
// w[k, c] = scale[g, c] * q[k, c] + min[g, c] with g = k / G. float16 scales and minimums (GGUF's
// own, where they are exact: Q4_1's are float16, K-quants' folded ones are not) and dropped
// symmetric minimums read less memory: a 4-bit weight is 0.625 bytes instead of 0.75, an 8-bit
// symmetric one 1.06 instead of 1.25: at decode, memory is one of the kernel's two limits (the
// unpacking instructions are the other).
//
// Below kDequantizeRows rows, per group
//   y[r, c] += scale[g, c] * sum_k x[r, k] q[k, c]  +  min[g, c] * sum_k x[r, k]
// where the inner sum multiplies x by the integers converted to float (exact), one FMA a weight
// and row, and the group sums of x are computed once per call. At decode (M = 1) the weights
// stream from memory at 0.5-1 byte each instead of 4, which is the whole point. From
// kDequantizeRows rows on (prefill, large batches) the FLOPs dominate instead: each panel is
// dequantized once into a float buffer and multiplied as float weights.
//
// Three code paths, chosen by the caller (pallas_kernels/cpu_linear_packed.py, from the CPU's
// flags) and checked here against the CPU: AVX-512 (the panel's 32 columns in two zmm), AVX2/FMA
// (32 columns in four ymm for one row, 16 in two for more) and portable C++. The vector paths
// are compiled with target attributes, so every build has all three whatever -march says.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define JPAGED_X86 1
#endif

#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kPanel = 32;
enum Isa : int32_t { kPortable = 1, kAvx2 = 2, kAvx512 = 3 };
// From this many rows on, the vector paths dequantize each panel once into a float buffer and
// multiply it as float weights; below, they unpack in registers per tile of rows.
constexpr int64_t kDequantizeRows = 16;
// A single pass over a panel's integers (128 bytes a row of words) prefetches this many rows
// ahead, 2 KiB: the hardware's prefetcher alone left a streaming decode call ~10% slower
// (gate_up and the Q8_0 lm_head of the default model on Zen 3, alternating in one process).
constexpr int64_t kPrefetchRows = 16;

#ifdef JPAGED_X86
// The row of words kPrefetchRows after row o of a panel's q (past its end: the scales, or the
// next panel, which come next anyway; a prefetch never faults).
inline void PrefetchAhead(const uint32_t* q, int64_t o) {
  _mm_prefetch(reinterpret_cast<const char*>(q + (o + kPrefetchRows) * kPanel), _MM_HINT_T0);
  _mm_prefetch(reinterpret_cast<const char*>(q + (o + kPrefetchRows) * kPanel + 16), _MM_HINT_T0);
}
#endif

struct Problem {
  const float* x;
  const uint32_t* q;   // panel p's words at q + p * q_stride
  const void* scales;  // float or float16 (half); panel p's at element p * sm_stride
  const void* mins;    // like scales; nullptr: -offset * scale
  const float* xsum;   // [M, K / G]
  // [M, K]: x[r, k] * 2^-(bits i) for k = o * per + i, i < per - 1, else x[r, k]: exact (powers of
  // two) unless |x| < 2^-102, and x * q again when multiplied by the in-place integer q * 2^(bits i).
  const float* xs;
  float* y;
  int64_t M, K, N, G, bits, q_stride, sm_stride;
  bool half;
  float offset;  // 2^(bits-1) when mins is nullptr
  int64_t groups() const { return K / G; }
  // Element index of panel p, group g, column c in scales/mins.
  int64_t at(int64_t p, int64_t g, int64_t c) const { return p * sm_stride + g * kPanel + c; }
};

// IEEE half -> float, exact (normals, subnormals, infinities, NaN).
inline float HalfToFloat(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000) << 16;
  uint32_t exp = (h >> 10) & 0x1F, man = h & 0x3FF, bits;
  if (exp == 0x1F) {
    bits = sign | 0x7F800000 | (man << 13);
  } else if (exp != 0) {
    bits = sign | ((exp + 112) << 23) | (man << 13);
  } else if (man == 0) {
    bits = sign;
  } else {  // subnormal: normalise
    int e = -1;
    do { ++e; man <<= 1; } while ((man & 0x400) == 0);
    bits = sign | ((112 - e) << 23) | ((man & 0x3FF) << 13);
  }
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

inline float ScaleAt(const Problem& s, int64_t i) {
  return s.half ? HalfToFloat(static_cast<const uint16_t*>(s.scales)[i]) : static_cast<const float*>(s.scales)[i];
}

inline float MinAt(const Problem& s, int64_t i) {
  if (s.mins == nullptr) return -s.offset * ScaleAt(s, i);
  return s.half ? HalfToFloat(static_cast<const uint16_t*>(s.mins)[i]) : static_cast<const float*>(s.mins)[i];
}

// ---- portable ------------------------------------------------------------------------------

// Integer i (< kPer) of a word: k = 8o + i (4 bits) or 4o + i (8 bits).
inline float QAt(uint32_t word, int i, int64_t bits) {
  return static_cast<float>(bits == 4 ? (word >> (4 * i)) & 0xF : (word >> (8 * i)) & 0xFF);
}

void PanelPortable(const Problem& s, int64_t p) {
  const int cols = static_cast<int>(std::min<int64_t>(kPanel, s.N - p * kPanel));
  const int per = static_cast<int>(32 / s.bits);  // integers a word
  const uint32_t* q = s.q + p * s.q_stride;
  for (int64_t r = 0; r < s.M; ++r) {
    float out[kPanel] = {};
    const float* x = s.x + r * s.K;
    for (int64_t g = 0; g < s.groups(); ++g) {
      float acc[kPanel] = {};
      for (int64_t o = g * s.G / per; o < (g + 1) * s.G / per; ++o) {
        for (int i = 0; i < per; ++i) {
          for (int c = 0; c < kPanel; ++c) acc[c] += x[o * per + i] * QAt(q[o * kPanel + c], i, s.bits);
        }
      }
      const float xs = s.xsum[r * s.groups() + g];
      for (int c = 0; c < kPanel; ++c) out[c] += ScaleAt(s, s.at(p, g, c)) * acc[c] + MinAt(s, s.at(p, g, c)) * xs;
    }
    std::memcpy(s.y + r * s.N + p * kPanel, out, cols * sizeof(float));
  }
}

#ifdef JPAGED_X86
// ---- AVX2 / FMA ----------------------------------------------------------------------------

// F16C converts float16 scales; every AVX2 CPU has it.
#define JPAGED_AVX2 "avx2,fma,f16c"

// Eight scales and minimums from element i of scales/mins (Problem::at).
__attribute__((target(JPAGED_AVX2))) inline __m256 LoadAvx2(const Problem& s, const void* base, int64_t i) {
  if (s.half) return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(base) + i)));
  return _mm256_loadu_ps(static_cast<const float*>(base) + i);
}

__attribute__((target(JPAGED_AVX2))) inline void ScaleMinAvx2(const Problem& s, int64_t i, __m256* scale, __m256* low) {
  *scale = LoadAvx2(s, s.scales, i);
  // -offset * scale is exact (a power of two), so a symmetric format computes as with its minimums.
  *low = s.mins != nullptr ? LoadAvx2(s, s.mins, i) : _mm256_mul_ps(*scale, _mm256_set1_ps(-s.offset));
}

// Rows [r0, r0 + R) against columns [8 v0, 8 (v0 + V)) of panel p: R * V accumulators. Each
// 32-bit lane holds one column's integers for kPer consecutive k, so unpacking is a mask and a
// convert inside the lane: no shuffles, which Zen 3 issues on fewer ports, and no shift: integer
// i is converted in place, as q * 2^(bits i), against s.xs (x scaled by 2^-(bits i), Problem),
// and the product is x * q exactly. The last integer is shifted down instead (masked in place it
// would set the sign bit).
// V = 4 (the whole panel, one pass over q) for one row, where q streams from memory; V = 2
// leaves registers for 4 rows once the panel is in cache.
template <int R, int V, int kBits>
__attribute__((target(JPAGED_AVX2))) void TileAvx2(const Problem& s, int64_t p, int64_t r0, int v0) {
  constexpr int kPer = 32 / kBits;
  constexpr uint32_t kMask = (1u << kBits) - 1;
  const uint32_t* q = s.q + p * s.q_stride + 8 * v0;
  const float* x = s.xs + r0 * s.K;
  const __m256i mask = _mm256_set1_epi32(kMask);
  __m256 out[R][V];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) out[r][v] = _mm256_setzero_ps();
  // One row has only V = 4 FMA chains, which their latency (4 cycles) would bound to one FMA
  // a cycle: even and odd integers go to two sets of accumulators instead.
  constexpr int S = R == 1 ? 2 : 1;
  for (int64_t g = 0; g < s.groups(); ++g) {
    __m256 acc[S][R][V];
#pragma GCC unroll 2
    for (int j = 0; j < S; ++j)
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
        for (int v = 0; v < V; ++v) acc[j][r][v] = _mm256_setzero_ps();
    for (int64_t o = g * s.G / kPer; o < (g + 1) * s.G / kPer; ++o) {
      if constexpr (V == 4) PrefetchAhead(q, o);  // one pass (V = 2 makes two; the second hits cache)
      __m256i words[V];
#pragma GCC unroll 4
      for (int v = 0; v < V; ++v) words[v] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + o * kPanel + 8 * v));
#pragma GCC unroll 8
      for (int i = 0; i < kPer; ++i) {
        __m256 w[V];
#pragma GCC unroll 4
        for (int v = 0; v < V; ++v) {
          w[v] = _mm256_cvtepi32_ps(i == kPer - 1 ? _mm256_srli_epi32(words[v], kBits * i)
                                                  : _mm256_and_si256(words[v], _mm256_slli_epi32(mask, kBits * i)));
        }
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r) {
          const __m256 a = _mm256_broadcast_ss(x + r * s.K + o * kPer + i);
#pragma GCC unroll 4
          for (int v = 0; v < V; ++v) acc[i % S][r][v] = _mm256_fmadd_ps(a, w[v], acc[i % S][r][v]);
        }
      }
    }
#pragma GCC unroll 2
    for (int j = 1; j < S; ++j)
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
        for (int v = 0; v < V; ++v) acc[0][r][v] = _mm256_add_ps(acc[0][r][v], acc[j][r][v]);
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) {
      __m256 scale, low;
      ScaleMinAvx2(s, s.at(p, g, 8 * (v0 + v)), &scale, &low);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        const __m256 xs = _mm256_set1_ps(s.xsum[(r0 + r) * s.groups() + g]);
        out[r][v] = _mm256_fmadd_ps(scale, acc[0][r][v], _mm256_fmadd_ps(low, xs, out[r][v]));
      }
    }
  }
  const int cols = static_cast<int>(std::min<int64_t>(kPanel, s.N - p * kPanel)) - 8 * v0;
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
#pragma GCC unroll 4
  for (int v = 0; v < V; ++v) {
    const __m256i store = _mm256_cmpgt_epi32(_mm256_set1_epi32(cols - 8 * v), lane);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      _mm256_maskstore_ps(s.y + (r0 + r) * s.N + p * kPanel + 8 * v0 + 8 * v, store, out[r][v]);
    }
  }
}

template <int R, int kBits>
__attribute__((target(JPAGED_AVX2))) void RowsAvx2(const Problem& s, int64_t p, int64_t r0) {
  if constexpr (R == 1) {
    TileAvx2<1, 4, kBits>(s, p, r0, 0);
  } else {
    TileAvx2<R, 2, kBits>(s, p, r0, 0);
    if (s.N - p * kPanel > 16) TileAvx2<R, 2, kBits>(s, p, r0, 2);
  }
}

// Many rows (prefill): unpacking per 4-row tile would repeat M / 4 times per panel, so the panel
// is dequantized once into a float [K, 32] buffer (L2-resident) and multiplied like float weights.
template <int kBits>
__attribute__((target(JPAGED_AVX2))) void DequantizePanelAvx2(const Problem& s, int64_t p, float* buf) {
  constexpr int kPer = 32 / kBits;
  const uint32_t* q = s.q + p * s.q_stride;
  const __m256i mask = _mm256_set1_epi32((1u << kBits) - 1);
  for (int64_t o = 0; o < s.K / kPer; ++o) {
    const int64_t g = o * kPer / s.G;
#pragma GCC unroll 4
    for (int v = 0; v < 4; ++v) {
      const __m256i words = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + o * kPanel + 8 * v));
      __m256 scale, low;
      ScaleMinAvx2(s, s.at(p, g, 8 * v), &scale, &low);
#pragma GCC unroll 8
      for (int i = 0; i < kPer; ++i) {
        const __m256 w = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(words, kBits * i), mask));
        _mm256_storeu_ps(buf + (o * kPer + i) * kPanel + 8 * v, _mm256_fmadd_ps(scale, w, low));
      }
    }
  }
}

// y[r0 + r, 16 h .. 16 h + 16) for r < R over a float panel [K, 32]: 2R accumulators.
template <int R>
__attribute__((target(JPAGED_AVX2))) void FloatTileAvx2(const Problem& s, const float* buf, int64_t p, int64_t r0,
                                                      int h) {
  __m256 acc[R][2];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
  const float* x = s.x + r0 * s.K;
  for (int64_t k = 0; k < s.K; ++k) {
    const __m256 b0 = _mm256_loadu_ps(buf + k * kPanel + 16 * h);
    const __m256 b1 = _mm256_loadu_ps(buf + k * kPanel + 16 * h + 8);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m256 a = _mm256_broadcast_ss(x + r * s.K + k);
      acc[r][0] = _mm256_fmadd_ps(a, b0, acc[r][0]);
      acc[r][1] = _mm256_fmadd_ps(a, b1, acc[r][1]);
    }
  }
  const int cols = static_cast<int>(std::min<int64_t>(kPanel, s.N - p * kPanel)) - 16 * h;
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
#pragma GCC unroll 2
  for (int v = 0; v < 2; ++v) {
    const __m256i store = _mm256_cmpgt_epi32(_mm256_set1_epi32(cols - 8 * v), lane);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      _mm256_maskstore_ps(s.y + (r0 + r) * s.N + p * kPanel + 16 * h + 8 * v, store, acc[r][v]);
    }
  }
}

template <int R>
__attribute__((target(JPAGED_AVX2))) void FloatRowsAvx2(const Problem& s, const float* buf, int64_t p, int64_t r0) {
  FloatTileAvx2<R>(s, buf, p, r0, 0);
  if (s.N - p * kPanel > 16) FloatTileAvx2<R>(s, buf, p, r0, 1);
}


template <int kBits>
__attribute__((target(JPAGED_AVX2))) void PanelAvx2(const Problem& s, int64_t p) {
  int64_t r = 0;
  if (s.M >= kDequantizeRows) {
    thread_local std::vector<float> buf;
    buf.resize(s.K * kPanel);
    DequantizePanelAvx2<kBits>(s, p, buf.data());
    for (; r + 6 <= s.M; r += 6) FloatRowsAvx2<6>(s, buf.data(), p, r);
    switch (s.M - r) {
      case 1: FloatRowsAvx2<1>(s, buf.data(), p, r); break;
      case 2: FloatRowsAvx2<2>(s, buf.data(), p, r); break;
      case 3: FloatRowsAvx2<3>(s, buf.data(), p, r); break;
      case 4: FloatRowsAvx2<4>(s, buf.data(), p, r); break;
      case 5: FloatRowsAvx2<5>(s, buf.data(), p, r); break;
      default: break;
    }
    return;
  }
  for (; r + 4 <= s.M; r += 4) RowsAvx2<4, kBits>(s, p, r);
  switch (s.M - r) {
    case 1: RowsAvx2<1, kBits>(s, p, r); break;
    case 2: RowsAvx2<2, kBits>(s, p, r); break;
    case 3: RowsAvx2<3, kBits>(s, p, r); break;
    default: break;
  }
}

// ---- AVX-512 -------------------------------------------------------------------------------

#define JPAGED_AVX512 "avx512f,avx512bw,avx512vl,avx2,fma,f16c"

__attribute__((target(JPAGED_AVX512))) inline __m512 LoadAvx512(const Problem& s, const void* base, int64_t i) {
  if (s.half) return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(base) + i)));
  return _mm512_loadu_ps(static_cast<const float*>(base) + i);
}

// The AVX2 tile with 16 lanes: the panel's 32 columns in two zmm, up to 6 rows.
template <int R, int kBits>
__attribute__((target(JPAGED_AVX512))) void TileAvx512(const Problem& s, int64_t p, int64_t r0) {
  constexpr int kPer = 32 / kBits;
  const uint32_t* q = s.q + p * s.q_stride;
  const float* x = s.xs + r0 * s.K;
  const __m512i mask = _mm512_set1_epi32((1u << kBits) - 1);
  __m512 out[R][2];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) out[r][0] = out[r][1] = _mm512_setzero_ps();
  // Few rows have few FMA chains (2 a row), bound by the FMA's latency: integer i goes to
  // accumulator set i % S, 8 chains in all.
  constexpr int S = R == 1 ? 4 : R <= 3 ? 2 : 1;
  for (int64_t g = 0; g < s.groups(); ++g) {
    __m512 acc[S][R][2];
#pragma GCC unroll 4
    for (int j = 0; j < S; ++j)
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) acc[j][r][0] = acc[j][r][1] = _mm512_setzero_ps();
    for (int64_t o = g * s.G / kPer; o < (g + 1) * s.G / kPer; ++o) {
      PrefetchAhead(q, o);
      const __m512i w0 = _mm512_loadu_si512(q + o * kPanel);
      const __m512i w1 = _mm512_loadu_si512(q + o * kPanel + 16);
#pragma GCC unroll 8
      for (int i = 0; i < kPer; ++i) {
        // As in TileAvx2: integer i in place against s.xs, the last one shifted down.
        const __m512i m = _mm512_slli_epi32(mask, kBits * i);
        const __m512 f0 = _mm512_cvtepi32_ps(i == kPer - 1 ? _mm512_srli_epi32(w0, kBits * i) : _mm512_and_si512(w0, m));
        const __m512 f1 = _mm512_cvtepi32_ps(i == kPer - 1 ? _mm512_srli_epi32(w1, kBits * i) : _mm512_and_si512(w1, m));
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r) {
          const __m512 a = _mm512_set1_ps(x[r * s.K + o * kPer + i]);
          acc[i % S][r][0] = _mm512_fmadd_ps(a, f0, acc[i % S][r][0]);
          acc[i % S][r][1] = _mm512_fmadd_ps(a, f1, acc[i % S][r][1]);
        }
      }
    }
#pragma GCC unroll 4
    for (int j = 1; j < S; ++j)
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r)
#pragma GCC unroll 2
        for (int v = 0; v < 2; ++v) acc[0][r][v] = _mm512_add_ps(acc[0][r][v], acc[j][r][v]);
#pragma GCC unroll 2
    for (int v = 0; v < 2; ++v) {
      const __m512 scale = LoadAvx512(s, s.scales, s.at(p, g, 16 * v));
      const __m512 low = s.mins != nullptr ? LoadAvx512(s, s.mins, s.at(p, g, 16 * v))
                                           : _mm512_mul_ps(scale, _mm512_set1_ps(-s.offset));
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        const __m512 xs = _mm512_set1_ps(s.xsum[(r0 + r) * s.groups() + g]);
        out[r][v] = _mm512_fmadd_ps(scale, acc[0][r][v], _mm512_fmadd_ps(low, xs, out[r][v]));
      }
    }
  }
  const int cols = static_cast<int>(std::min<int64_t>(kPanel, s.N - p * kPanel));
  const __mmask16 m0 = cols >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << cols) - 1);
  const __mmask16 m1 = cols <= 16 ? 0 : cols >= 32 ? 0xFFFF : static_cast<__mmask16>((1u << (cols - 16)) - 1);
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    _mm512_mask_storeu_ps(s.y + (r0 + r) * s.N + p * kPanel, m0, out[r][0]);
    _mm512_mask_storeu_ps(s.y + (r0 + r) * s.N + p * kPanel + 16, m1, out[r][1]);
  }
}

template <int kBits>
__attribute__((target(JPAGED_AVX512))) void PanelAvx512(const Problem& s, int64_t p) {
  // Many rows: the AVX2 path's dequantize-then-multiply (a zmm float tile is not written yet).
  if (s.M >= kDequantizeRows) return PanelAvx2<kBits>(s, p);
  int64_t r = 0;
  for (; r + 6 <= s.M; r += 6) TileAvx512<6, kBits>(s, p, r);
  switch (s.M - r) {
    case 1: TileAvx512<1, kBits>(s, p, r); break;
    case 2: TileAvx512<2, kBits>(s, p, r); break;
    case 3: TileAvx512<3, kBits>(s, p, r); break;
    case 4: TileAvx512<4, kBits>(s, p, r); break;
    case 5: TileAvx512<5, kBits>(s, p, r); break;
    default: break;
  }
}

bool CpuHas(Isa isa) {
  __builtin_cpu_init();
  if (isa == kAvx512) return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                             __builtin_cpu_supports("avx512vl");
  if (isa == kAvx2) {
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  }
  return true;
}
#else
bool CpuHas(Isa isa) { return isa == kPortable; }
#endif

using PanelFn = void (*)(const Problem&, int64_t);

ffi::Error LinearPacked(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::AnyBuffer panels,
                        ffi::ResultBuffer<ffi::F32> y, int32_t isa, int32_t bits, int32_t group_size) {
  auto xd = x.dimensions(), pd = panels.dimensions(), yd = y->dimensions();
  if (bits != 4 && bits != 8) return ffi::Error::InvalidArgument("linear_packed: bits must be 4 or 8");
  const ffi::DataType dtype = panels.element_type();
  if (dtype != ffi::DataType::U32 && dtype != ffi::DataType::U16) {
    return ffi::Error::InvalidArgument("linear_packed: panels must be uint32 (float32 scales) or uint16 (float16)");
  }
  const int64_t elem = dtype == ffi::DataType::U32 ? 4 : 2;  // bytes of a panels element and of a scale
  if (xd.size() != 2 || pd.size() != 2 || yd.size() != 2 || yd[0] != xd[0] || group_size <= 0 ||
      xd[1] % group_size != 0 || group_size % (32 / bits) != 0 || (yd[1] + kPanel - 1) / kPanel != pd[0]) {
    return ffi::Error::InvalidArgument("linear_packed: x [M, K], panels [ceil(N / 32), X], y [M, N], K % G == 0");
  }
  const int64_t q_elems = xd[1] * bits / 32 * kPanel * 4 / elem, sm_elems = xd[1] / group_size * kPanel;
  if (pd[1] != q_elems + sm_elems && pd[1] != q_elems + 2 * sm_elems) {
    return ffi::Error::InvalidArgument("linear_packed: a panel's row is not its integers, scales and (or not) minimums");
  }
  if (isa != kPortable && isa != kAvx2 && isa != kAvx512) return ffi::Error::InvalidArgument("linear_packed: bad isa");
  if (!CpuHas(static_cast<Isa>(isa))) return ffi::Error::InvalidArgument("linear_packed: this CPU lacks the isa");
  Problem s;
  s.M = xd[0];
  s.K = xd[1];
  s.N = yd[1];
  s.G = group_size;
  s.bits = bits;
  s.x = x.typed_data();
  const char* base = static_cast<const char*>(panels.untyped_data());
  s.q = reinterpret_cast<const uint32_t*>(base);
  s.q_stride = pd[1] * elem / 4;
  s.scales = base + q_elems * elem;
  s.mins = pd[1] == q_elems + sm_elems ? nullptr : base + (q_elems + sm_elems) * elem;
  s.sm_stride = pd[1];
  s.half = elem == 2;
  s.offset = static_cast<float>(1 << (bits - 1));
  s.y = y->typed_data();
  if (s.M == 0 || s.N == 0) return ffi::Error::Success();
  // The group sums of x: sum_k x[r, k] over each group, for the minimums' term (the paths that
  // dequantize a panel first do not need them).
  const bool factored = isa == kPortable || s.M < kDequantizeRows;
  std::vector<float> xsum(factored ? s.M * s.groups() : 0);
  for (int64_t r = 0; factored && r < s.M; ++r) {
    for (int64_t g = 0; g < s.groups(); ++g) {
      float t = 0.f;
      for (int64_t k = g * s.G; k < (g + 1) * s.G; ++k) t += s.x[r * s.K + k];
      xsum[r * s.groups() + g] = t;
    }
  }
  s.xsum = xsum.data();
  // The vector paths' in-place integers need x pre-scaled (Problem::xs); the portable one shifts.
  std::vector<float> xs(isa != kPortable && s.M < kDequantizeRows ? s.M * s.K : 0);
  const int64_t per = 32 / bits;  // K is a multiple of per, so a row starts at integer 0
  float pow2[8];
  for (int64_t i = 0; i < per; ++i) pow2[i] = i == per - 1 ? 1.f : std::ldexp(1.f, static_cast<int>(-bits * i));
  // Word by word, not k % per per element: a division each cost a decode call 1.5-2.5 us.
  for (int64_t w = 0; w < static_cast<int64_t>(xs.size()); w += per) {
    for (int64_t i = 0; i < per; ++i) xs[w + i] = s.x[w + i] * pow2[i];
  }
  s.xs = xs.data();
#ifdef JPAGED_X86
  const PanelFn avx2 = s.bits == 4 ? PanelAvx2<4> : PanelAvx2<8>;
  const PanelFn avx512 = s.bits == 4 ? PanelAvx512<4> : PanelAvx512<8>;
  const PanelFn panel = isa == kAvx512 ? avx512 : isa == kAvx2 ? avx2 : PanelPortable;
#else
  const PanelFn panel = PanelPortable;
#endif
  jpaged::ParallelForSegments(pool, pd[0], [&](int64_t p) { panel(s, p); });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JpagedLinearPackedF32, LinearPacked,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int32_t>("isa")
                                  .Attr<int32_t>("bits")
                                  .Attr<int32_t>("group_size"));
