// Ragged paged attention for XLA:CPU, called from jax through the XLA FFI.
//
// Same contract as pallas_kernels/reference.py (float32 only):
//   q            [T, N, H]      flat query tokens of all sequences, end to end
//   k/v pages    [NP, L, K, H]  the layer's page pool; head n reads KV head n / (N / K)
//   block_tables [S, P]         page ids per sequence
//   kv_lens      [S]            KV length per sequence after this step's tokens
//   cu_q_lens    [S + 1]        cumulative query lengths; tokens past cu_q_lens[S] are padding
//   out          [T, N, H]      padding tokens get 0
//
// XLA's gathers and reductions move KV at ~5 GB/s on a 2-core CPU; this kernel reads each K/V
// row once per (sequence, query tile) through the block table, straight from the pool. Work
// items (sequence, tile of up to kTileTokens tokens, all heads) are shared by the calling thread
// and XLA's pool (parallel.h). Per block of kBlock KV positions: scores (dots for decode tiles, rank-1
// updates over a transposed copy of K for prefill tiles), one online-softmax rescale, P @ V.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
#endif

#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kTileTokens = 16;  // query tokens per work item
constexpr int kBlock = 64;       // KV positions per softmax update
constexpr float kMask = -1e30f;
constexpr int kTransposeRows = 32;  // from this many rows per item, scores go through transposed K
constexpr int kSplitUnit = 16;  // KV positions: a lone decode tile splits across threads in runs of this many

// exp(x) for x <= 0 (Cephes' polynomial, ~1 ulp): written so the loops around it vectorize.
inline float exp_nonpositive(float x) {
  x = std::max(x, -87.0f);
  float n = std::floor(x * 1.44269504088896341f + 0.5f);
  float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  float y = p * r * r + r + 1.0f;
  int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return y * scale;
}

struct Problem {
  const float* q;
  const float* k;
  const float* v;
  const int32_t* tables;
  const int32_t* kv_lens;
  const int32_t* cu_q_lens;
  float* out;
  int64_t num_pages, page_size, num_kv_heads, head_dim, num_heads, group;
  int64_t num_seqs, pages_per_seq;
  float scale;
  int64_t window;  // 0 = no sliding window
};

// A sequence's tile of tokens, all heads, over KV positions [pos_begin, pos_end) of what the tile
// sees (part of them for a decode tile when there are fewer tiles than threads: one sequence alone
// would use one core). An item over part of the positions leaves its rows unnormalized in
// `partial` ([rows, H + 2]: acc, then the running max and sum), for PagedAttention to merge.
struct Item {
  int32_t seq, first_token, num_tokens;
  int32_t pos_begin = 0, pos_end = INT32_MAX;
  float* partial = nullptr;
};

// Scratch per thread, sized for the largest tile.
struct Scratch {
  std::vector<float> qs, kt, s, m, l, acc;
  std::vector<int32_t> pos, lo, head;
  void Resize(int64_t rows, int64_t kv_heads, int64_t head_dim) {
    qs.resize(rows * head_dim);
    kt.resize(kv_heads * head_dim * kBlock);
    s.resize(rows * kBlock);
    m.resize(rows);
    l.resize(rows);
    acc.resize(rows * head_dim);
    pos.resize(rows);
    lo.resize(rows);
    head.resize(rows);
  }
};

// s[0, kBlock) = q [H] . kt[h * kBlock + jj] over h: scores of one row against a transposed block.
inline void ScoreRow(const float* q, const float* kt, int64_t H, float* s) {
#if defined(__AVX512F__)
  static_assert(kBlock % 16 == 0);
  __m512 acc[kBlock / 16];  // the row's scores stay in registers over the H loop
  for (int i = 0; i < kBlock / 16; ++i) acc[i] = _mm512_setzero_ps();
  for (int64_t h = 0; h < H; ++h) {
    const __m512 qh = _mm512_set1_ps(q[h]);
    for (int i = 0; i < kBlock / 16; ++i) acc[i] = _mm512_fmadd_ps(qh, _mm512_loadu_ps(kt + h * kBlock + 16 * i), acc[i]);
  }
  for (int i = 0; i < kBlock / 16; ++i) _mm512_storeu_ps(s + 16 * i, acc[i]);
#elif defined(__AVX2__) && defined(__FMA__)
  static_assert(kBlock % 8 == 0);
  __m256 acc[kBlock / 8];  // 8 of the 16 ymm registers for kBlock = 64
#pragma GCC unroll 8
  for (int i = 0; i < kBlock / 8; ++i) acc[i] = _mm256_setzero_ps();
  for (int64_t h = 0; h < H; ++h) {
    const __m256 qh = _mm256_broadcast_ss(q + h);
#pragma GCC unroll 8
    for (int i = 0; i < kBlock / 8; ++i) acc[i] = _mm256_fmadd_ps(qh, _mm256_loadu_ps(kt + h * kBlock + 8 * i), acc[i]);
  }
#pragma GCC unroll 8
  for (int i = 0; i < kBlock / 8; ++i) _mm256_storeu_ps(s + 8 * i, acc[i]);
#else
  float row[kBlock] = {};
  for (int64_t h = 0; h < H; ++h) {
    for (int jj = 0; jj < kBlock; ++jj) row[jj] += q[h] * kt[h * kBlock + jj];
  }
  std::memcpy(s, row, sizeof(row));
#endif
}

#if defined(__AVX2__) && defined(__FMA__)
// op over a vector's 8 lanes (op: _mm_add_ps or _mm_max_ps, wrapped).
template <typename Op>
inline float Horizontal(__m256 a, Op op) {
  __m128 h = op(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  h = op(h, _mm_movehl_ps(h, h));
  return _mm_cvtss_f32(op(h, _mm_movehdup_ps(h)));
}
inline float HorizontalSum(__m256 a) {
  return Horizontal(a, [](__m128 x, __m128 y) { return _mm_add_ps(x, y); });
}
#endif

// max(init, s[0], ..., s[kBlock - 1]); std::max over a loop stays scalar (NaN rules), a chain
// of dependent vmaxss that took a quarter of the prefill time.
inline float BlockMax(const float* s, float init) {
#if defined(__AVX512F__)
  __m512 m = _mm512_max_ps(_mm512_loadu_ps(s), _mm512_loadu_ps(s + 16));
  for (int i = 32; i < kBlock; i += 16) m = _mm512_max_ps(m, _mm512_loadu_ps(s + i));
  return std::max(init, _mm512_reduce_max_ps(m));
#elif defined(__AVX2__) && defined(__FMA__)
  __m256 m = _mm256_max_ps(_mm256_loadu_ps(s), _mm256_loadu_ps(s + 8));
  for (int i = 16; i < kBlock; i += 8) m = _mm256_max_ps(m, _mm256_loadu_ps(s + i));
  return std::max(init, Horizontal(m, [](__m128 a, __m128 b) { return _mm_max_ps(a, b); }));
#else
  float part[8] = {init, init, init, init, init, init, init, init};  // independent chains
  for (int jj = 0; jj < kBlock; ++jj) part[jj % 8] = std::max(part[jj % 8], s[jj]);
  return *std::max_element(part, part + 8);
#endif
}

// s[0] + ... + s[kBlock - 1]: as one scalar chain (without -ffast-math) the sum kept the
// exponentials' loop from vectorizing.
inline float BlockSum(const float* s) {
#if defined(__AVX2__) && defined(__FMA__)
  __m256 a = _mm256_add_ps(_mm256_loadu_ps(s), _mm256_loadu_ps(s + 8));
  for (int i = 16; i < kBlock; i += 8) a = _mm256_add_ps(a, _mm256_loadu_ps(s + i));
  return HorizontalSum(a);
#else
  float part[8] = {};
  for (int jj = 0; jj < kBlock; ++jj) part[jj % 8] += s[jj];
  float sum = 0.0f;
  for (float x : part) sum += x;
  return sum;
#endif
}

// acc [H] = alpha * acc + sum_jj p[jj] * v_rows[jj][v_offset : v_offset + H] over jj in [first, last).
template <int64_t kHeadDim>
inline void AccumulatePV(float* __restrict acc, float alpha, const float* p, const float* const* v_rows,
                         int64_t v_offset, int first, int last, int64_t H) {
#if defined(__AVX512F__)
  if constexpr (kHeadDim > 0 && kHeadDim % 16 == 0) {
    constexpr int kVecs = kHeadDim / 16;
    __m512 a[kVecs];  // the accumulator stays in registers over the positions
    const __m512 scale = _mm512_set1_ps(alpha);
    for (int i = 0; i < kVecs; ++i) a[i] = _mm512_mul_ps(_mm512_loadu_ps(acc + 16 * i), scale);
    for (int jj = first; jj < last; ++jj) {
      const __m512 pj = _mm512_set1_ps(p[jj]);
      const float* v = v_rows[jj] + v_offset;
      for (int i = 0; i < kVecs; ++i) a[i] = _mm512_fmadd_ps(pj, _mm512_loadu_ps(v + 16 * i), a[i]);
    }
    for (int i = 0; i < kVecs; ++i) _mm512_storeu_ps(acc + 16 * i, a[i]);
    return;
  }
#elif defined(__AVX2__) && defined(__FMA__)
  if constexpr (kHeadDim > 0 && kHeadDim % 64 == 0) {
    // 64 columns at a time: 8 accumulators fit the 16 ymm registers, 16 would not.
    const __m256 scale = _mm256_set1_ps(alpha);
    for (int c = 0; c < kHeadDim; c += 64) {
      __m256 a[8];
#pragma GCC unroll 8
      for (int i = 0; i < 8; ++i) a[i] = _mm256_mul_ps(_mm256_loadu_ps(acc + c + 8 * i), scale);
      for (int jj = first; jj < last; ++jj) {
        const __m256 pj = _mm256_broadcast_ss(p + jj);
        const float* v = v_rows[jj] + v_offset + c;
#pragma GCC unroll 8
        for (int i = 0; i < 8; ++i) a[i] = _mm256_fmadd_ps(pj, _mm256_loadu_ps(v + 8 * i), a[i]);
      }
#pragma GCC unroll 8
      for (int i = 0; i < 8; ++i) _mm256_storeu_ps(acc + c + 8 * i, a[i]);
    }
    return;
  }
#endif
  for (int64_t h = 0; h < H; ++h) acc[h] *= alpha;
  for (int jj = first; jj < last; ++jj) {
    const float* __restrict v = v_rows[jj] + v_offset;
    for (int64_t h = 0; h < H; ++h) acc[h] += p[jj] * v[h];
  }
}

// q [H] . k [H]. Vectorized in a few independent chains: as one chain of scalar FMAs (the
// order the compiler must keep without -ffast-math) decode's scores took most of its time.
template <int64_t kHeadDim>
inline float Dot(const float* __restrict q, const float* __restrict k, int64_t H) {
#if defined(__AVX2__) && defined(__FMA__)
  if constexpr (kHeadDim > 0 && kHeadDim % 16 == 0) {
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
#pragma GCC unroll 8
    for (int64_t h = 0; h < kHeadDim; h += 16) {
      a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + h), _mm256_loadu_ps(k + h), a0);
      a1 = _mm256_fmadd_ps(_mm256_loadu_ps(q + h + 8), _mm256_loadu_ps(k + h + 8), a1);
    }
    return HorizontalSum(_mm256_add_ps(a0, a1));
  }
#endif
  float dot = 0.0f;
  for (int64_t h = 0; h < H; ++h) dot += q[h] * k[h];
  return dot;
}

// Offset of KV position j's [K, H] row in the pools, through the sequence's block table. Page
// ids are clamped into the pool and the page index to the table, so a bad table reads a wrong
// row, never outside the pool.
inline int64_t RowOffset(const Problem& pb, const int32_t* table, int32_t j) {
  const int64_t page_idx = std::min<int64_t>(j / pb.page_size, pb.pages_per_seq - 1);
  const int64_t page = std::clamp<int64_t>(table[page_idx], 0, pb.num_pages - 1);
  return (page * pb.page_size + j % pb.page_size) * pb.num_kv_heads * pb.head_dim;
}

// One sequence's tile of tokens: row r is token r / N, query head r % N, which reads KV head
// (r % N) / G. Every K/V row of the pool ([K, H], contiguous) is read once per item.
// kHeadDim > 0 fixes H at compile time, so a row's accumulator stays in registers.
template <int64_t kHeadDim>
void RunItem(const Problem& pb, const Item& it, Scratch& sc) {
  const int64_t H = kHeadDim > 0 ? kHeadDim : pb.head_dim;
  const int64_t G = pb.group, K = pb.num_kv_heads, N = pb.num_heads;
  const int64_t rows = it.num_tokens * N;
  const int32_t q_start = pb.cu_q_lens[it.seq];
  const int32_t q_len = pb.cu_q_lens[it.seq + 1] - q_start;
  const int32_t kv_len = pb.kv_lens[it.seq];
  const int32_t* table = pb.tables + static_cast<int64_t>(it.seq) * pb.pages_per_seq;

  // Row r's KV head: computed once, not per position (two integer divisions per row and position
  // were a good part of a decode step's attention).
  for (int64_t r = 0; r < rows; ++r) sc.head[r] = static_cast<int32_t>((r % N) / G);
  const float* q_src = pb.q + static_cast<int64_t>(it.first_token) * N * H;
  for (int64_t i = 0; i < rows * H; ++i) sc.qs[i] = q_src[i] * pb.scale;
  for (int64_t r = 0; r < rows; ++r) {
    const int32_t p = kv_len - q_len + (it.first_token + static_cast<int32_t>(r / N) - q_start);
    sc.pos[r] = p;
    sc.lo[r] = pb.window > 0 ? std::max<int32_t>(0, p - static_cast<int32_t>(pb.window) + 1) : 0;
    sc.m[r] = kMask;
    sc.l[r] = 0.0f;
  }
  std::fill(sc.acc.begin(), sc.acc.begin() + rows * H, 0.0f);
  const int32_t begin = std::max(sc.lo[0], it.pos_begin);  // rows are in position order
  const int32_t end = std::min(sc.pos[rows - 1] + 1, it.pos_end);

  // Few rows (decode): one dot per (row, position) straight from the pool. Many rows (prefill
  // tiles): K transposed once per block, so scores are rank-1 updates along the block.
  const bool transpose = rows >= kTransposeRows;
  const float* kv_row[kBlock];  // V pool row [K, H] of position j0 + jj
  for (int32_t j0 = begin; j0 < end; j0 += kBlock) {
    const int n = std::min<int32_t>(kBlock, end - j0);
    // Pages are scattered over the pool, so the hardware prefetcher stops at every page end:
    // request the next block's rows while this one computes.
    for (int32_t j = j0 + kBlock; j < std::min<int32_t>(end, j0 + 2 * kBlock); ++j) {
      const int64_t offset = RowOffset(pb, table, j);
      for (int64_t x = 0; x < K * H; x += 16) {
        __builtin_prefetch(pb.k + offset + x);
        __builtin_prefetch(pb.v + offset + x);
      }
    }
    for (int jj = 0; jj < n; ++jj) {
      const int64_t offset = RowOffset(pb, table, j0 + jj);
      const float* kr = pb.k + offset;
      kv_row[jj] = pb.v + offset;
      if (transpose) {
        for (int64_t x = 0; x < K * H; ++x) sc.kt[x * kBlock + jj] = kr[x];
      } else {
        for (int64_t r = 0; r < rows; ++r) sc.s[r * kBlock + jj] = Dot<kHeadDim>(sc.qs.data() + r * H, kr + sc.head[r] * H, H);
      }
    }
    for (int64_t r = 0; r < rows; ++r) {
      const int32_t lo = sc.lo[r], hi = sc.pos[r];
      if (hi < j0 || lo >= j0 + n) continue;  // nothing visible to this row in the block
      const int64_t kv_head = sc.head[r];
      float* __restrict s = sc.s.data() + r * kBlock;
      if (transpose) ScoreRow(sc.qs.data() + r * H, sc.kt.data() + kv_head * H * kBlock, H, s);
      const int first = std::max(lo - j0, 0), last = std::min(hi - j0 + 1, n);  // visible: [first, last)
      for (int jj = 0; jj < kBlock; ++jj) s[jj] = (jj >= first && jj < last) ? s[jj] : kMask;
      const float mx = BlockMax(s, sc.m[r]);
      const float alpha = exp_nonpositive(sc.m[r] - mx);
      for (int jj = 0; jj < kBlock; ++jj) s[jj] = s[jj] > 0.5f * kMask ? exp_nonpositive(s[jj] - mx) : 0.0f;
      const float sum = BlockSum(s);
      sc.m[r] = mx;
      sc.l[r] = sc.l[r] * alpha + sum;
      AccumulatePV<kHeadDim>(sc.acc.data() + r * H, alpha, s, kv_row, kv_head * H, first, last, H);
    }
  }
  if (it.partial != nullptr) {
    for (int64_t r = 0; r < rows; ++r) {
      float* dst = it.partial + r * (H + 2);
      std::copy(sc.acc.begin() + r * H, sc.acc.begin() + (r + 1) * H, dst);
      dst[H] = sc.m[r];
      dst[H + 1] = sc.l[r];
    }
    return;
  }
  float* out = pb.out + static_cast<int64_t>(it.first_token) * N * H;
  for (int64_t r = 0; r < rows; ++r) {
    const float inv = sc.l[r] > 0.0f ? 1.0f / sc.l[r] : 0.0f;
    for (int64_t h = 0; h < H; ++h) out[r * H + h] = sc.acc[r * H + h] * inv;
  }
}

void RunOne(const Problem& pb, const Item& item) {
  thread_local Scratch scratch;
  scratch.Resize(kTileTokens * pb.num_heads, pb.num_kv_heads, pb.head_dim);
  switch (pb.head_dim) {
    case 64: RunItem<64>(pb, item, scratch); break;
    case 128: RunItem<128>(pb, item, scratch); break;
    default: RunItem<0>(pb, item, scratch);
  }
}

ffi::Error PagedAttention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k_pages,
                          ffi::Buffer<ffi::F32> v_pages, ffi::Buffer<ffi::S32> block_tables,
                          ffi::Buffer<ffi::S32> kv_lens, ffi::Buffer<ffi::S32> cu_q_lens,
                          ffi::ResultBuffer<ffi::F32> out, float scale, int64_t sliding_window) {
  auto qd = q.dimensions(), kd = k_pages.dimensions(), td = block_tables.dimensions();
  if (qd.size() != 3 || kd.size() != 4 || td.size() != 2 || kd[2] == 0 || qd[1] % kd[2] != 0 || qd[2] != kd[3]) {
    return ffi::Error::InvalidArgument("paged attention: q [T, N, H], pages [NP, L, K, H] with N % K == 0");
  }
  if (kv_lens.element_count() != td[0] || cu_q_lens.element_count() != td[0] + 1) {
    return ffi::Error::InvalidArgument("paged attention: kv_lens [S] and cu_q_lens [S + 1] must match block_tables [S, P]");
  }
  const Problem pb{q.typed_data(), k_pages.typed_data(), v_pages.typed_data(), block_tables.typed_data(),
               kv_lens.typed_data(), cu_q_lens.typed_data(), out->typed_data(),
               kd[0], kd[1], kd[2], kd[3], qd[1], qd[1] / kd[2], td[0], td[1], scale, sliding_window};
  const int64_t num_tokens = qd[0];
  std::vector<Item> items;
  std::memset(pb.out, 0, num_tokens * pb.num_heads * pb.head_dim * sizeof(float));
  for (int32_t s = 0; s < pb.num_seqs; ++s) {
    const int32_t first = pb.cu_q_lens[s], last = std::min<int64_t>(pb.cu_q_lens[s + 1], num_tokens);
    if (last - first <= 0 || pb.kv_lens[s] < last - first) continue;  // padding sequence
    for (int32_t t = first; t < last; t += kTileTokens) {
      items.push_back(Item{s, t, std::min<int32_t>(kTileTokens, last - t)});
    }
  }
  const int64_t workers = jpaged::Workers(pool);
  // Fewer tiles than threads (one sequence decoding): decode tiles split by KV position into up to
  // one part a thread (runs of kSplitUnit positions), merged below. Each part reads whole K/V rows
  // (all heads, contiguous within a page, which the prefetchers follow): split by KV head as well,
  // each thread read a third of every row, and one stream's attention took ~1.5x as long (3 KV
  // heads, 2 threads). Prefill tiles transpose all of K per item (kTransposeRows), so they stay whole.
  struct Split {
    Item tile;
    int32_t parts;
    size_t partial;  // part 0's [rows, H + 2] in partials; part p's follows at p * rows * (H + 2)
  };
  std::vector<Split> splits;
  std::vector<float> partials;
  if (static_cast<int64_t>(items.size()) < workers) {
    std::vector<Item> split;
    std::vector<std::pair<size_t, size_t>> partial_of;  // (index in split, offset in partials)
    for (const Item& it : items) {
      const int64_t rows = it.num_tokens * pb.num_heads, part_size = rows * (pb.head_dim + 2);
      if (rows >= kTransposeRows) {
        split.push_back(it);
        continue;
      }
      const int32_t q_start = pb.cu_q_lens[it.seq], q_len = pb.cu_q_lens[it.seq + 1] - q_start;
      const int32_t first = pb.kv_lens[it.seq] - q_len + (it.first_token - q_start);  // the tile's first position
      const int32_t begin = pb.window > 0 ? std::max<int32_t>(0, first - static_cast<int32_t>(pb.window) + 1) : 0;
      const int32_t units = (first + it.num_tokens - begin + kSplitUnit - 1) / kSplitUnit;
      const int32_t parts = static_cast<int32_t>(std::clamp<int64_t>(units, 1, workers));
      if (parts > 1) {
        splits.push_back(Split{it, parts, partials.size()});
        partials.resize(partials.size() + parts * part_size);
      }
      for (int32_t part = 0; part < parts; ++part) {
        Item piece = it;
        if (parts > 1) {
          piece.pos_begin = begin + units * part / parts * kSplitUnit;
          piece.pos_end = begin + units * (part + 1) / parts * kSplitUnit;
          partial_of.emplace_back(split.size(), splits.back().partial + part * part_size);
        }
        split.push_back(piece);
      }
    }
    for (const auto& [i, offset] : partial_of) split[i].partial = partials.data() + offset;  // partials is final
    items.swap(split);
  }
  jpaged::ParallelFor(pool, static_cast<int64_t>(items.size()), [&](int64_t i) { RunOne(pb, items[i]); });
  // Split tiles: the parts' softmax states rescaled to their common max, summed, normalized.
  const int64_t H = pb.head_dim;
  for (const Split& sp : splits) {
    const int64_t rows = sp.tile.num_tokens * pb.num_heads, part_size = rows * (H + 2);
    float* out = pb.out + static_cast<int64_t>(sp.tile.first_token) * pb.num_heads * H;  // zeroed above
    for (int64_t r = 0; r < rows; ++r) {
      const float* row = partials.data() + sp.partial + r * (H + 2);
      float mx = kMask, l = 0.0f;
      for (int32_t part = 0; part < sp.parts; ++part) mx = std::max(mx, row[part * part_size + H]);
      for (int32_t part = 0; part < sp.parts; ++part) {
        const float* p = row + part * part_size;
        const float w = exp_nonpositive(p[H] - mx);
        l += p[H + 1] * w;
        for (int64_t h = 0; h < H; ++h) out[r * H + h] += p[h] * w;
      }
      const float inv = l > 0.0f ? 1.0f / l : 0.0f;
      for (int64_t h = 0; h < H; ++h) out[r * H + h] *= inv;
    }
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JpagedPagedAttentionF32, PagedAttention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale")
                                  .Attr<int64_t>("sliding_window"));
