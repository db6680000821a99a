// y = x @ w for XLA:CPU, called from jax through the XLA FFI (float32).
//
//   x  [M, K]        activations, row-major
//   w  [P, K, 32]    the weight [K, N] cut into P = ceil(N / 32) column panels, each contiguous
//                    (pallas_kernels/cpu_linear.py:pack_columns; columns past N are zero)
//   y  [M, N]
//
// XLA:CPU runs a dot with a few dozen rows (a decode step's batch) on one core through Eigen;
// here the panels are shared by the calling thread and XLA's pool (parallel.h), so all cores work.
// Each 8 x 32 block of y is accumulated over the whole of K in 16 registers (with AVX2 only,
// 6 x 16 in 12) and stored once; while a thread works on a panel it prefetches the next one,
// because at these shapes the weights stream from memory and the step is as much about
// bandwidth as about FMAs.

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
#endif

#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kPanel = 32;  // columns per panel: two AVX-512 vectors
#if defined(__AVX512F__)
constexpr int kRows = 8;    // rows per register block: 16 accumulators
#elif defined(__AVX2__) && defined(__FMA__)
constexpr int kRows = 6;  // 6 rows x 16 columns: 12 accumulators of the 16 ymm registers

// y[r, c0 : c0 + 8 kV] (clipped to cols) for r < kR, accumulated over K in kR * kV registers.
// kV = 4 reads each panel row in one pass, for up to 4 rows, where the panel streams from memory
// (at 4 rows two of the 16 accumulators spill, still faster than two passes over half rows);
// kV = 2 leaves room for 6 rows, enough independent FMAs to hide their latency. The unroll
// pragmas keep the arrays in registers: without them GCC stores every accumulator every k.
template <int kR, int kV>
inline void Tile(const float* __restrict x, int64_t K, const float* __restrict panel, int c0, const float* next,
                 float* __restrict y, int64_t N, int cols) {
  __m256 acc[kR][kV];
#pragma GCC unroll 8
  for (int r = 0; r < kR; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < kV; ++v) acc[r][v] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    const float* b = panel + k * kPanel + c0;
    if (next != nullptr) {
#pragma GCC unroll 2
      for (int v = 0; v < kV; v += 2) _mm_prefetch(reinterpret_cast<const char*>(next + k * kPanel + c0 + 8 * v), _MM_HINT_T0);
    }
    __m256 bv[kV];
#pragma GCC unroll 4
    for (int v = 0; v < kV; ++v) bv[v] = _mm256_loadu_ps(b + 8 * v);
#pragma GCC unroll 8
    for (int r = 0; r < kR; ++r) {
      const __m256 a = _mm256_broadcast_ss(x + r * K + k);
#pragma GCC unroll 4
      for (int v = 0; v < kV; ++v) acc[r][v] = _mm256_fmadd_ps(a, bv[v], acc[r][v]);
    }
  }
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
#pragma GCC unroll 4
  for (int v = 0; v < kV; ++v) {
    const __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(cols - c0 - 8 * v), lane);
#pragma GCC unroll 8
    for (int r = 0; r < kR; ++r) _mm256_maskstore_ps(y + r * N + c0 + 8 * v, mask, acc[r][v]);
  }
}
#else
constexpr int kRows = 8;
#endif

// y[r, 0:cols] = sum_k x[r, k] * panel[k, 0:kPanel] for r < kR; cols <= kPanel. While the k loop
// runs, the rows of `next` (a panel or null) are requested into the cache.
template <int kR>
inline void Block(const float* __restrict x, int64_t K, const float* __restrict panel, const float* next,
                  float* __restrict y, int64_t N, int cols) {
#if defined(__AVX512F__)
  __m512 lo[kR], hi[kR];
  for (int r = 0; r < kR; ++r) lo[r] = hi[r] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    const __m512 b0 = _mm512_loadu_ps(panel + k * kPanel);
    const __m512 b1 = _mm512_loadu_ps(panel + k * kPanel + 16);
    if (next != nullptr) {
      _mm_prefetch(reinterpret_cast<const char*>(next + k * kPanel), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(next + k * kPanel + 16), _MM_HINT_T0);
    }
    for (int r = 0; r < kR; ++r) {
      const __m512 a = _mm512_set1_ps(x[r * K + k]);
      lo[r] = _mm512_fmadd_ps(a, b0, lo[r]);
      hi[r] = _mm512_fmadd_ps(a, b1, hi[r]);
    }
  }
  const __mmask16 m0 = cols >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << cols) - 1);
  const __mmask16 m1 = cols <= 16 ? 0 : cols >= 32 ? 0xFFFF : static_cast<__mmask16>((1u << (cols - 16)) - 1);
  for (int r = 0; r < kR; ++r) {
    _mm512_mask_storeu_ps(y + r * N, m0, lo[r]);
    _mm512_mask_storeu_ps(y + r * N + 16, m1, hi[r]);
  }
#elif defined(__AVX2__) && defined(__FMA__)
  if constexpr (kR <= 4) {
    // One row consumes a panel as fast as the hardware prefetcher streams it; the software
    // prefetches only compete with it for miss buffers (measured: 5-20% slower).
    Tile<kR, 4>(x, K, panel, 0, kR == 1 ? nullptr : next, y, N, cols);
  } else {
    Tile<kR, 2>(x, K, panel, 0, next, y, N, cols);
    if (cols > 16) Tile<kR, 2>(x, K, panel, 16, next, y, N, cols);
  }
#else
  (void)next;
  float acc[kR][kPanel] = {};
  for (int64_t k = 0; k < K; ++k) {
    for (int r = 0; r < kR; ++r) {
      for (int c = 0; c < kPanel; ++c) acc[r][c] += x[r * K + k] * panel[k * kPanel + c];
    }
  }
  for (int r = 0; r < kR; ++r) std::copy(acc[r], acc[r] + cols, y + r * N);
#endif
}

// The last M % kRows rows of a panel.
void Remainder(int rows, const float* x, int64_t K, const float* panel, const float* next, float* y, int64_t N,
               int cols) {
  switch (rows) {
    case 1: Block<1>(x, K, panel, next, y, N, cols); break;
    case 2: Block<2>(x, K, panel, next, y, N, cols); break;
    case 3: Block<3>(x, K, panel, next, y, N, cols); break;
    case 4: Block<4>(x, K, panel, next, y, N, cols); break;
    case 5: Block<5>(x, K, panel, next, y, N, cols); break;
    case 6: Block<6>(x, K, panel, next, y, N, cols); break;
    case 7: Block<7>(x, K, panel, next, y, N, cols); break;
    default: break;
  }
}

struct Shared {
  const float* x;
  const float* w;
  float* y;
  int64_t M, K, N, panels;
};

// Panels [p0, p1): all rows of y, panel after panel, prefetching the next panel of the chunk.
void RunChunk(const Shared& s, int64_t p0, int64_t p1) {
  const int64_t panel_size = s.K * kPanel;
  for (int64_t p = p0; p < p1; ++p) {
    const float* panel = s.w + p * panel_size;
    const float* next = p + 1 < p1 ? panel + panel_size : nullptr;  // fetched during the first row block
    const int cols = static_cast<int>(std::min<int64_t>(kPanel, s.N - p * kPanel));
    float* y = s.y + p * kPanel;
    int64_t r = 0;
    for (; r + kRows <= s.M; r += kRows, next = nullptr) {
      Block<kRows>(s.x + r * s.K, s.K, panel, next, y + r * s.N, s.N, cols);
    }
    if (r < s.M) Remainder(static_cast<int>(s.M - r), s.x + r * s.K, s.K, panel, next, y + r * s.N, s.N, cols);
  }
}

ffi::Error Linear(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                  ffi::ResultBuffer<ffi::F32> y) {
  auto xd = x.dimensions(), wd = w.dimensions(), yd = y->dimensions();
  if (xd.size() != 2 || wd.size() != 3 || yd.size() != 2 || wd[2] != kPanel || wd[1] != xd[1] || yd[0] != xd[0] ||
      (yd[1] + kPanel - 1) / kPanel != wd[0]) {
    return ffi::Error::InvalidArgument("linear: x [M, K], w [ceil(N / 32), K, 32], y [M, N]");
  }
  Shared s;
  s.x = x.typed_data();
  s.w = w.typed_data();
  s.y = y->typed_data();
  s.M = xd[0];
  s.K = xd[1];
  s.N = yd[1];
  s.panels = wd[0];
  if (s.M == 0 || s.N == 0) return ffi::Error::Success();
  // A few chunks per thread: enough to even out a thread that starts late, long enough that
  // the prefetch of the next panel mostly stays inside a chunk.
  const int64_t chunk = std::max<int64_t>(1, s.panels / (4 * jpaged::Workers(pool)));
  jpaged::ParallelFor(pool, (s.panels + chunk - 1) / chunk,
                      [&](int64_t i) { RunChunk(s, i * chunk, std::min(s.panels, (i + 1) * chunk)); });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JpagedLinearF32, Linear,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
