// y = x @ w for XLA:CPU with w packed as 4- or 8-bit group-wise integers (jpaged/models/packed.py),
// dequantized in registers, accumulated in float32. Called from jax through the XLA FFI.
//
//   x       [M, K]            float32 activations, row-major
//   q       [P, K, 16]        4 bits: byte c of row k holds column c (low nibble) and c + 16 (high)
//           [P, K, 32]        8 bits: one byte a column
//   scales  [P, K / G, 32]    float32, a panel's 32 columns of one group contiguous
//   mins    [P, K / G, 32]
//   y       [M, N]            P = ceil(N / 32); columns past N have zero scale and minimum
//
// w[k, c] = scale[g, c] * q[k, c] + min[g, c] with g = k / G, so per group
//   y[r, c] += scale[g, c] * sum_k x[r, k] q[k, c]  +  min[g, c] * sum_k x[r, k]
// The inner sum multiplies x by the integers converted to float (exact), one FMA a weight and
// row; the group sums of x are computed once per call. At decode (M = 1) the weights stream from
// memory at 0.5-1 byte each instead of 4, which is the whole point.
//
// Three code paths, chosen by the caller (pallas_kernels/cpu_linear_packed.py, from the CPU's
// flags) and checked here against the CPU: AVX-512 (32 columns in two zmm), AVX2/FMA (16
// columns in two ymm, both halves for one row) and portable C++. The vector paths are compiled
// with target attributes, so every build has all three whatever -march says.

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define JPAGED_X86 1
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kPanel = 32;
enum Isa : int32_t { kPortable = 1, kAvx2 = 2, kAvx512 = 3 };

struct Problem {
  const float* x;
  const uint8_t* q;
  const float* scales;
  const float* mins;
  const float* xsum;  // [M, K / G]
  float* y;
  int64_t M, K, N, G, bits;
  int64_t groups() const { return K / G; }
  int64_t row_bytes() const { return bits == 4 ? kPanel / 2 : kPanel; }  // q bytes per k of a panel
};

// ---- portable ------------------------------------------------------------------------------

inline int QAt(const uint8_t* row, int c, int64_t bits) {
  if (bits == 8) return row[c];
  return c < 16 ? (row[c] & 0x0F) : (row[c - 16] >> 4);
}

void PanelPortable(const Problem& s, int64_t p) {
  const int cols = static_cast<int>(std::min<int64_t>(kPanel, s.N - p * kPanel));
  const uint8_t* q = s.q + p * s.K * s.row_bytes();
  const float* sc = s.scales + p * s.groups() * kPanel;
  const float* mn = s.mins + p * s.groups() * kPanel;
  for (int64_t r = 0; r < s.M; ++r) {
    float out[kPanel] = {};
    const float* x = s.x + r * s.K;
    for (int64_t g = 0; g < s.groups(); ++g) {
      float acc[kPanel] = {};
      for (int64_t k = g * s.G; k < (g + 1) * s.G; ++k) {
        const uint8_t* row = q + k * s.row_bytes();
        for (int c = 0; c < kPanel; ++c) acc[c] += x[k] * static_cast<float>(QAt(row, c, s.bits));
      }
      const float xs = s.xsum[r * s.groups() + g];
      for (int c = 0; c < kPanel; ++c) out[c] += sc[g * kPanel + c] * acc[c] + mn[g * kPanel + c] * xs;
    }
    std::memcpy(s.y + r * s.N + p * kPanel, out, cols * sizeof(float));
  }
}

#ifdef JPAGED_X86
// ---- AVX2 / FMA ----------------------------------------------------------------------------

// 16 columns' integers (half h of the panel) of one k row as bytes.
__attribute__((target("avx2,fma"))) inline __m128i HalfBytes(const uint8_t* row, int h, int64_t bits) {
  if (bits == 8) return _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + 16 * h));
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row));
  return _mm_and_si128(h == 0 ? b : _mm_srli_epi16(b, 4), _mm_set1_epi8(0x0F));
}

// Rows [0, R) of x against columns [16 h0, 16 (h0 + H)) of panel p; R * 2H accumulators.
// H = 2 (the whole panel, one pass over q) for few rows, where q streams from memory;
// H = 1 leaves registers for 4 rows, enough independent FMAs once the panel is in cache.
template <int R, int H>
__attribute__((target("avx2,fma"))) void TileAvx2(const Problem& s, int64_t p, int64_t r0, int h0) {
  const uint8_t* q = s.q + p * s.K * s.row_bytes();
  const float* sc = s.scales + p * s.groups() * kPanel + 16 * h0;
  const float* mn = s.mins + p * s.groups() * kPanel + 16 * h0;
  const float* x = s.x + r0 * s.K;
  __m256 out[R][2 * H];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < 2 * H; ++v) out[r][v] = _mm256_setzero_ps();
  for (int64_t g = 0; g < s.groups(); ++g) {
    __m256 acc[R][2 * H];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
      for (int v = 0; v < 2 * H; ++v) acc[r][v] = _mm256_setzero_ps();
    for (int64_t k = g * s.G; k < (g + 1) * s.G; ++k) {
      const uint8_t* row = q + k * s.row_bytes();
      __m256 w[2 * H];
#pragma GCC unroll 2
      for (int h = 0; h < H; ++h) {
        const __m128i b = HalfBytes(row, h0 + h, s.bits);
        w[2 * h] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(b));
        w[2 * h + 1] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_unpackhi_epi64(b, b)));
      }
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        const __m256 a = _mm256_broadcast_ss(x + r * s.K + k);
#pragma GCC unroll 4
        for (int v = 0; v < 2 * H; ++v) acc[r][v] = _mm256_fmadd_ps(a, w[v], acc[r][v]);
      }
    }
#pragma GCC unroll 4
    for (int v = 0; v < 2 * H; ++v) {
      const __m256 scale = _mm256_loadu_ps(sc + g * kPanel + 8 * v);
      const __m256 low = _mm256_loadu_ps(mn + g * kPanel + 8 * v);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        const __m256 xs = _mm256_set1_ps(s.xsum[(r0 + r) * s.groups() + g]);
        out[r][v] = _mm256_fmadd_ps(scale, acc[r][v], _mm256_fmadd_ps(low, xs, out[r][v]));
      }
    }
  }
  const int cols = static_cast<int>(std::min<int64_t>(kPanel, s.N - p * kPanel)) - 16 * h0;
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
#pragma GCC unroll 4
  for (int v = 0; v < 2 * H; ++v) {
    const __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(cols - 8 * v), lane);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      _mm256_maskstore_ps(s.y + (r0 + r) * s.N + p * kPanel + 16 * h0 + 8 * v, mask, out[r][v]);
    }
  }
}

template <int R>
__attribute__((target("avx2,fma"))) void RowsAvx2(const Problem& s, int64_t p, int64_t r0) {
  if constexpr (R <= 2) {
    TileAvx2<R, 2>(s, p, r0, 0);
  } else {
    TileAvx2<R, 1>(s, p, r0, 0);
    if (s.N - p * kPanel > 16) TileAvx2<R, 1>(s, p, r0, 1);
  }
}

__attribute__((target("avx2,fma"))) void PanelAvx2(const Problem& s, int64_t p) {
  int64_t r = 0;
  for (; r + 4 <= s.M; r += 4) RowsAvx2<4>(s, p, r);
  switch (s.M - r) {
    case 1: RowsAvx2<1>(s, p, r); break;
    case 2: RowsAvx2<2>(s, p, r); break;
    case 3: RowsAvx2<3>(s, p, r); break;
    default: break;
  }
}

// ---- AVX-512 -------------------------------------------------------------------------------

#define JPAGED_AVX512 "avx512f,avx512bw,avx512vl,avx2,fma"

template <int R>
__attribute__((target(JPAGED_AVX512))) void TileAvx512(const Problem& s, int64_t p, int64_t r0) {
  const uint8_t* q = s.q + p * s.K * s.row_bytes();
  const float* sc = s.scales + p * s.groups() * kPanel;
  const float* mn = s.mins + p * s.groups() * kPanel;
  const float* x = s.x + r0 * s.K;
  __m512 out[R][2];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) out[r][0] = out[r][1] = _mm512_setzero_ps();
  for (int64_t g = 0; g < s.groups(); ++g) {
    __m512 acc[R][2];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
    for (int64_t k = g * s.G; k < (g + 1) * s.G; ++k) {
      const uint8_t* row = q + k * s.row_bytes();
      __m128i b0, b1;
      if (s.bits == 8) {
        b0 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row));
        b1 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + 16));
      } else {
        const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row));
        b0 = _mm_and_si128(b, _mm_set1_epi8(0x0F));
        b1 = _mm_and_si128(_mm_srli_epi16(b, 4), _mm_set1_epi8(0x0F));
      }
      const __m512 w0 = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(b0));
      const __m512 w1 = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(b1));
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        const __m512 a = _mm512_set1_ps(x[r * s.K + k]);
        acc[r][0] = _mm512_fmadd_ps(a, w0, acc[r][0]);
        acc[r][1] = _mm512_fmadd_ps(a, w1, acc[r][1]);
      }
    }
#pragma GCC unroll 2
    for (int v = 0; v < 2; ++v) {
      const __m512 scale = _mm512_loadu_ps(sc + g * kPanel + 16 * v);
      const __m512 low = _mm512_loadu_ps(mn + g * kPanel + 16 * v);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        const __m512 xs = _mm512_set1_ps(s.xsum[(r0 + r) * s.groups() + g]);
        out[r][v] = _mm512_fmadd_ps(scale, acc[r][v], _mm512_fmadd_ps(low, xs, out[r][v]));
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

__attribute__((target(JPAGED_AVX512))) void PanelAvx512(const Problem& s, int64_t p) {
  int64_t r = 0;
  for (; r + 6 <= s.M; r += 6) TileAvx512<6>(s, p, r);
  switch (s.M - r) {
    case 1: TileAvx512<1>(s, p, r); break;
    case 2: TileAvx512<2>(s, p, r); break;
    case 3: TileAvx512<3>(s, p, r); break;
    case 4: TileAvx512<4>(s, p, r); break;
    case 5: TileAvx512<5>(s, p, r); break;
    default: break;
  }
}

bool CpuHas(Isa isa) {
  __builtin_cpu_init();
  if (isa == kAvx512) return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                             __builtin_cpu_supports("avx512vl");
  if (isa == kAvx2) return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return true;
}
#else
bool CpuHas(Isa isa) { return isa == kPortable; }
#endif

using PanelFn = void (*)(const Problem&, int64_t);

// Held by shared_ptr: a pool task that starts after the caller has returned finds no panels left.
struct Work {
  Problem s;
  PanelFn panel;
  int64_t panels, chunk, chunks;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
};

void Drain(Work& w) {
  for (int64_t i; (i = w.next.fetch_add(1)) < w.chunks;) {
    for (int64_t p = i * w.chunk; p < std::min(w.panels, (i + 1) * w.chunk); ++p) w.panel(w.s, p);
    w.done.fetch_add(1, std::memory_order_release);
  }
}

ffi::Error LinearPacked(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::U8> q,
                        ffi::Buffer<ffi::F32> scales, ffi::Buffer<ffi::F32> mins, ffi::ResultBuffer<ffi::F32> y,
                        int32_t isa) {
  auto xd = x.dimensions(), qd = q.dimensions(), sd = scales.dimensions(), yd = y->dimensions();
  if (xd.size() != 2 || qd.size() != 3 || sd.size() != 3 || yd.size() != 2 || yd[0] != xd[0] || qd[1] != xd[1] ||
      (qd[2] != kPanel && qd[2] != kPanel / 2) || sd[0] != qd[0] || sd[2] != kPanel || sd[1] == 0 ||
      xd[1] % sd[1] != 0 || mins.dimensions().size() != 3 || mins.dimensions()[1] != sd[1] ||
      mins.dimensions()[0] != sd[0] || mins.dimensions()[2] != sd[2] || (yd[1] + kPanel - 1) / kPanel != qd[0]) {
    return ffi::Error::InvalidArgument(
        "linear_packed: x [M, K], q [ceil(N / 32), K, 16 or 32], scales and mins [ceil(N / 32), K / G, 32], y [M, N]");
  }
  if (isa != kPortable && isa != kAvx2 && isa != kAvx512) return ffi::Error::InvalidArgument("linear_packed: bad isa");
  if (!CpuHas(static_cast<Isa>(isa))) return ffi::Error::InvalidArgument("linear_packed: this CPU lacks the isa");
  auto work = std::make_shared<Work>();
  Problem& s = work->s;
  s.M = xd[0];
  s.K = xd[1];
  s.N = yd[1];
  s.G = s.K / sd[1];
  s.bits = qd[2] == kPanel ? 8 : 4;
  s.x = x.typed_data();
  s.q = q.typed_data();
  s.scales = scales.typed_data();
  s.mins = mins.typed_data();
  s.y = y->typed_data();
  if (s.M == 0 || s.N == 0) return ffi::Error::Success();
  // The group sums of x: sum_k x[r, k] over each group, for the minimums' term.
  auto xsum = std::make_shared<std::vector<float>>(s.M * s.groups());
  for (int64_t r = 0; r < s.M; ++r) {
    for (int64_t g = 0; g < s.groups(); ++g) {
      float t = 0.f;
      for (int64_t k = g * s.G; k < (g + 1) * s.G; ++k) t += s.x[r * s.K + k];
      (*xsum)[r * s.groups() + g] = t;
    }
  }
  s.xsum = xsum->data();
#ifdef JPAGED_X86
  work->panel = isa == kAvx512 ? PanelAvx512 : isa == kAvx2 ? PanelAvx2 : PanelPortable;
#else
  work->panel = PanelPortable;
#endif
  work->panels = qd[0];
  const int64_t workers = pool.num_threads() + 1;
  work->chunk = std::max<int64_t>(1, work->panels / (4 * workers));
  work->chunks = (work->panels + work->chunk - 1) / work->chunk;
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), work->chunks - 1);
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([work, xsum] { Drain(*work); });
  Drain(*work);
  // Chunks a pool thread has claimed are running now; wait for them (never for unstarted tasks).
  while (work->done.load(std::memory_order_acquire) < work->chunks) std::this_thread::yield();
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JpagedLinearPackedF32, LinearPacked,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int32_t>("isa"));
