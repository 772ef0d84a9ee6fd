// Block-sparse attention for the CPU: the forward and backward of `vgpt_jax.attention`'s
// blockwise backend as two XLA FFI handlers (`vgpt_jax.attention_cpu` builds, loads and calls
// them; the pure-JAX tile loops stay the reference and the fallback).
//
// Why a kernel: XLA:CPU runs each tile loop step's small batched dots on one core and starts
// big dots beside other ops on one core too, so a 48-frame train step kept its 2 cores about
// half busy. Here one call spreads its work items over all cores (helpers on XLA's own pool):
// (sample, head, q tile) rows in the forward, (sample, head) pairs in the backward (so that dq
// sums in a fixed order), each running single-threaded SGEMMs (OpenBLAS, whose function pointer
// Python hands in) on whole tiles where every pair is visible, and on the visible rectangles of
// the others (`for_each_rectangle`).
//
// Inputs are already in the blockwise backend's arranged order (noisy blocks first, padded to
// whole tiles), in the model's [B, T, H, D] layout, q pre-scaled by 1/sqrt(D). The mask comes
// as `pairs` [B, NBq, NBk, R, R] (uint8): for each (query block, key block) pair, visibility for
// each pair of offset classes; `offset_class` [L] maps an in-block offset to its class. The
// mask rule itself (`attention.visible`) is evaluated in JAX on those representatives only, so
// it is written once.
//
// Numerics follow the JAX tile loops: float32 scores, an online softmax whose running max
// starts at -1e30, masked scores -inf (exp gives exactly 0), lse = +inf for a row that sees no
// key (its output and gradients are 0).
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <memory>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// cblas_sgemm with 32-bit ints (scipy-openblas32's scipy_cblas_sgemm); row-major only.
using Sgemm = void (*)(int order, int trans_a, int trans_b, int m, int n, int k, float alpha,
                       const float* a, int lda, const float* b, int ldb, float beta, float* c,
                       int ldc);
Sgemm g_sgemm = nullptr;
constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;
constexpr float kNeg = -1e30f;  // the running max's start (finite: exp(m - m_new) is never NaN)

void gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, const float* a, int64_t lda,
          const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  g_sgemm(kRowMajor, ta ? kTrans : kNoTrans, tb ? kTrans : kNoTrans, int(m), int(n), int(k),
          1.0f, a, int(lda), b, int(ldb), beta, c, int(ldc));
}

// exp for x <= 0 (scores minus their row's max or logsumexp): exactly 0 below -86 and for
// -inf; Cephes' expf polynomial, which the compiler vectorises (a libm call would not be,
// without -ffast-math, whose finite-math assumption the -inf scores break). Rounding by the
// 1.5 * 2^23 trick, as floor / nearbyint vectorise only under relaxed math flags.
inline float exp_nonpositive(float x) {
  const bool zero = !(x > -86.0f);  // -inf, and anything whose exp is below float's normal range
  x = zero ? 0.0f : x;
  constexpr float kRound = 12582912.0f;
  const float n = (x * 1.44269504088896341f + kRound) - kRound;
  float f = x - n * 0.693359375f;
  f = f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * f + 1.3981999507e-3f;
  p = p * f + 8.3334519073e-3f;
  p = p * f + 4.1665795894e-2f;
  p = p * f + 1.6666665459e-1f;
  p = p * f + 5.0000001201e-1f;
  p = p * f * f + f + 1.0f;
  int32_t bits;
  std::memcpy(&bits, &p, 4);
  bits += int32_t(n) << 23;
  std::memcpy(&p, &bits, 4);
  return zero ? 0.0f : p;
}

// max(init, x[0..n)): 16 running maxima, so the compiler emits vector maxes (a max reduction
// loop stays scalar without -ffast-math, and was half of the forward's own time).
inline float row_max(const float* x, int64_t n, float init) {
  float part[16];
  std::fill(part, part + 16, init);
  int64_t at = 0;
  for (; at + 16 <= n; at += 16)
    for (int e = 0; e < 16; ++e) part[e] = part[e] > x[at + e] ? part[e] : x[at + e];
  for (; at < n; ++at) part[0] = part[0] > x[at] ? part[0] : x[at];
  return *std::max_element(part, part + 16);
}

struct Geometry {
  int64_t B, T, S, H, D, L, R, tile_q, tile_k;  // tile_q / tile_k: blocks per tile
  int64_t bq() const { return tile_q * L; }
  int64_t bk() const { return tile_k * L; }
  int64_t nq() const { return T / bq(); }
  int64_t nk() const { return S / bk(); }
  int64_t nbq() const { return T / L; }
  int64_t nbk() const { return S / L; }
  int64_t row() const { return H * D; }  // stride between tokens in [B, T, H, D]
};

// The key blocks one query block sees within one kv tile: [lo, hi), in blocks from the tile's
// start (empty when hi == lo), and whether every pair in that range is visible (no mask to add).
struct Span {
  int32_t lo = 0, hi = 0;
  bool full = false;
  bool operator==(const Span& o) const { return lo == o.lo && hi == o.hi && full == o.full; }
};

// Per sample, query block and kv tile ([B, NBq, nk]): the span of key blocks it sees, from the
// block-pair table.
struct Visibility {
  std::vector<Span> spans;
  const Span& span(const Geometry& g, int64_t b, int64_t a, int64_t j) const {
    return spans[(b * g.nbq() + a) * g.nk() + j];
  }
};

Visibility visibility(const Geometry& g, const uint8_t* pairs) {
  Visibility vis{std::vector<Span>(g.B * g.nbq() * g.nk())};
  const int64_t rr = g.R * g.R;
  const auto nonzero = [](uint8_t x) { return x != 0; };
  std::vector<uint8_t> all(g.tile_k);  // per key block of the tile: every pair visible
  for (int64_t b = 0; b < g.B; ++b)
    for (int64_t j = 0; j < g.nk(); ++j)
      for (int64_t a = 0; a < g.nbq(); ++a) {
        int32_t lo = -1, hi = -1;
        for (int64_t cb = 0; cb < g.tile_k; ++cb) {
          const uint8_t* p = pairs + ((b * g.nbq() + a) * g.nbk() + j * g.tile_k + cb) * rr;
          all[cb] = std::all_of(p, p + rr, nonzero);
          if (std::any_of(p, p + rr, nonzero)) hi = int32_t(cb) + 1, lo = lo < 0 ? int32_t(cb) : lo;
        }
        if (lo >= 0)
          vis.spans[(b * g.nbq() + a) * g.nk() + j] =
              Span{lo, hi, std::all_of(all.begin() + lo, all.begin() + hi, nonzero)};
      }
  return vis;
}

// The rectangles of tile (i, j) of sample b that hold visible pairs, as fn(first query block,
// query blocks, first key block, key blocks, masked), in blocks from the tile's start: each run
// of query blocks that see the same key span, over that span only, masked only where some pair
// in it is hidden. A tile whose pairs are all visible is thus one unmasked rectangle (one SGEMM
// per product), and a tile with none visible is skipped. In the block-causal layout most spans
// are whole visible blocks (a noisy block against itself, a query against the clean blocks
// before it), so partial tiles cost their visible pairs rather than their area (the main job's
// 576 tokens see a third of the area of their visible tiles; 16 frames of 16x16 latents 62%,
// 48 frames 85%).
template <typename Fn>
void for_each_rectangle(const Geometry& g, const Visibility& vis, int64_t b, int64_t i,
                        int64_t j, Fn fn) {
  for (int64_t qb = 0; qb < g.tile_q;) {
    const Span& s = vis.span(g, b, i * g.tile_q + qb, j);
    int64_t run = 1;
    while (qb + run < g.tile_q && vis.span(g, b, i * g.tile_q + qb + run, j) == s) ++run;
    if (s.hi > s.lo) fn(qb, run, int64_t(s.lo), int64_t(s.hi - s.lo), !s.full);
    qb += run;
  }
}

// Adds the mask to scores s [nqb * L, ncb * L] (row stride ld) of query blocks [a0, a0 + nqb)
// against key blocks [c0, c0 + ncb) of sample b: -inf where a pair is hidden. A query block's
// rows of one offset class share their mask, so it is expanded once per (query block, class)
// into `bias` (0 or -inf) and added to each such row: a vectorised add instead of a table lookup
// per score.
void apply_mask(const Geometry& g, const uint8_t* pairs, const int32_t* offset_class, int64_t b,
                int64_t a0, int64_t nqb, int64_t c0, int64_t ncb, float* s, int64_t ld,
                float* bias) {
  const int64_t L = g.L, width = ncb * L;
  const float neg_inf = -std::numeric_limits<float>::infinity();
  for (int64_t qb = 0; qb < nqb; ++qb) {
    for (int64_t ca = 0; ca < g.R; ++ca) {
      for (int64_t cb = 0; cb < ncb; ++cb) {
        const uint8_t* p = pairs + ((b * g.nbq() + a0 + qb) * g.nbk() + c0 + cb) * g.R * g.R +
                           ca * g.R;
        for (int64_t o = 0; o < L; ++o) bias[cb * L + o] = p[offset_class[o]] ? 0.0f : neg_inf;
      }
      for (int64_t o = 0; o < L; ++o) {
        if (offset_class[o] != ca) continue;
        float* srow = s + (qb * L + o) * ld;
#pragma omp simd
        for (int64_t x = 0; x < width; ++x) srow[x] += bias[x];
      }
    }
  }
}

// Runs fn(slot, item) for item in [0, n) on up to `threads` threads: this one (slot 0) and
// threads - 1 helpers scheduled on XLA's own intra-op pool (slots 1..threads-1), items handed out
// one at a time so uneven rows (clean history grows along the video) balance. Helpers run on
// XLA's pool rather than on threads started per call, so they never compete for a core with
// XLA's own workers (as fast on the 2-core build machine: 48 frames, forward 80 vs 82 ms and
// backward 183 vs 180 ms, the kernel alone). The pool may start a helper late or, while its
// threads are busy, not before this call ends, so this thread takes whatever is left and waits
// only for items a helper has claimed; a late helper finds no item and touches nothing but the
// shared counters, which it keeps alive.
struct WorkQueue {
  explicit WorkQueue(int64_t n) : n(n) {}
  const int64_t n;
  std::atomic<int64_t> next{0}, done{0}, slots{1};
  std::function<void(int64_t, int64_t)> fn;  // set until every item is done
  void run(int64_t slot) {
    for (int64_t item; (item = next.fetch_add(1)) < n;) {
      fn(slot, item);
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

template <typename Fn>
void parallel_for(ffi::ThreadPool& pool, int64_t n, int64_t threads, Fn fn) {
  auto queue = std::make_shared<WorkQueue>(n);
  queue->fn = fn;
  threads = std::max<int64_t>(1, std::min(threads, n));
  for (int64_t h = 1; h < threads; ++h)
    pool.Schedule([queue] { queue->run(queue->slots.fetch_add(1)); });
  queue->run(0);
  while (queue->done.load(std::memory_order_acquire) < n) std::this_thread::yield();
}

Geometry geometry(ffi::Buffer<ffi::F32>& q, ffi::Buffer<ffi::F32>& k,
                  ffi::Buffer<ffi::U8>& pairs, int64_t block_len, int64_t tile_q,
                  int64_t tile_k) {
  auto qd = q.dimensions(), kd = k.dimensions(), pd = pairs.dimensions();
  return Geometry{qd[0], qd[1], kd[1], qd[2], qd[3], block_len, pd[4], tile_q, tile_k};
}

// Shapes the Python wrapper guarantees, checked so a misuse fails with a message rather than
// reading out of bounds.
ffi::Error check(const Geometry& g, ffi::Buffer<ffi::F32>& q, ffi::Buffer<ffi::F32>& k,
                 ffi::Buffer<ffi::F32>& v, ffi::Buffer<ffi::U8>& pairs,
                 ffi::Buffer<ffi::S32>& offset_class, int64_t threads) {
  auto bad = [](const char* what) {
    return ffi::Error::InvalidArgument(std::string("vgpt blockwise CPU kernel: ") + what);
  };
  if (!g_sgemm) return bad("no SGEMM set");
  auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions(), pd = pairs.dimensions();
  if (qd.size() != 4 || kd.size() != 4 || vd.size() != 4 || pd.size() != 5)
    return bad("expected q, k, v [B, T, H, D] and pairs [B, NBq, NBk, R, R]");
  if (kd[0] != g.B || kd[2] != g.H || kd[3] != g.D || vd[0] != kd[0] || vd[1] != kd[1] ||
      vd[2] != kd[2] || vd[3] != kd[3])
    return bad("k and v must match q's batch, heads and head size, and each other");
  if (g.L <= 0 || g.tile_q <= 0 || g.tile_k <= 0 || g.T % g.bq() || g.S % g.bk())
    return bad("the sequences are not whole tiles of whole blocks");
  if (pd[0] != g.B || pd[1] != g.nbq() || pd[2] != g.nbk() || pd[3] != g.R)
    return bad("pairs must be [B, T / L, S / L, R, R]");
  if (offset_class.element_count() != size_t(g.L)) return bad("offset_class must have L entries");
  for (size_t o = 0; o < offset_class.element_count(); ++o)
    if (offset_class.typed_data()[o] < 0 || offset_class.typed_data()[o] >= g.R)
      return bad("offset_class entries must be classes in [0, R)");
  if (threads < 1) return bad("threads must be at least 1");
  return ffi::Error::Success();
}

ffi::Error Forward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                   ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::U8> pairs,
                   ffi::Buffer<ffi::S32> offset_class, int64_t block_len, int64_t tile_q,
                   int64_t tile_k, int64_t threads,
                   ffi::ResultBuffer<ffi::F32> out, ffi::ResultBuffer<ffi::F32> lse) {
  const Geometry g = geometry(q, k, pairs, block_len, tile_q, tile_k);
  if (auto e = check(g, q, k, v, pairs, offset_class, threads); e.failure()) return e;
  const Visibility vis = visibility(g, pairs.typed_data());
  const int64_t bq = g.bq(), bk = g.bk(), D = g.D, L = g.L, ld = g.row();
  const float *Q = q.typed_data(), *K = k.typed_data(), *V = v.typed_data();
  float *O = out->typed_data(), *LSE = lse->typed_data();
  std::vector<std::vector<float>> scratch(std::max<int64_t>(1, threads));

  // One item: a (sample, head, q tile) row, online softmax over its visible kv tiles. A row a
  // rectangle leaves out sees only -inf scores there, which leave its state as it is.
  parallel_for(pool, g.B * g.H * g.nq(), threads, [&](int64_t t, int64_t item) {
    const int64_t i = item % g.nq(), h = (item / g.nq()) % g.H, b = item / (g.nq() * g.H);
    auto& buf = scratch[t];
    buf.resize(bq * bk + bq * D + 2 * bq + bk);
    float *s = buf.data(), *acc = s + bq * bk, *m = acc + bq * D, *l = m + bq, *bias = l + bq;
    std::fill(acc, acc + bq * D, 0.0f);
    std::fill(m, m + bq, kNeg);
    std::fill(l, l + bq, 0.0f);
    const float* q_i = Q + ((b * g.T + i * bq) * g.H + h) * D;
    for (int64_t j = 0; j < g.nk(); ++j) {
      const float* k_j = K + ((b * g.S + j * bk) * g.H + h) * D;
      const float* v_j = V + ((b * g.S + j * bk) * g.H + h) * D;
      for_each_rectangle(g, vis, b, i, j, [&](int64_t qb, int64_t nqb, int64_t cb, int64_t ncb,
                                             bool masked) {
        const int64_t r0 = qb * L, nr = nqb * L, c0 = cb * L, nc = ncb * L;
        gemm(false, true, nr, nc, D, q_i + r0 * ld, ld, k_j + c0 * ld, ld, 0.0f, s, nc);
        if (masked)
          apply_mask(g, pairs.typed_data(), offset_class.typed_data(), b, i * g.tile_q + qb,
                     nqb, j * g.tile_k + cb, ncb, s, nc, bias);
        for (int64_t r = r0; r < r0 + nr; ++r) {
          float* sr = s + (r - r0) * nc;
          const float mx = row_max(sr, nc, m[r]);
          float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
          for (int64_t x = 0; x < nc; ++x) {
            sr[x] = exp_nonpositive(sr[x] - mx);
            sum += sr[x];
          }
          const float corr = exp_nonpositive(m[r] - mx);
          l[r] = l[r] * corr + sum;
          m[r] = mx;
          for (int64_t d = 0; d < D; ++d) acc[r * D + d] *= corr;
        }
        gemm(false, false, nr, D, nc, s, nc, v_j + c0 * ld, ld, 1.0f, acc + r0 * D, D);
      });
    }
    for (int64_t r = 0; r < bq; ++r) {
      float* o_r = O + ((b * g.T + i * bq + r) * g.H + h) * D;
      const bool seen = l[r] > 0.0f;
      const float inv = seen ? 1.0f / l[r] : 0.0f;
      for (int64_t d = 0; d < D; ++d) o_r[d] = acc[r * D + d] * inv;
      LSE[(b * g.H + h) * g.T + i * bq + r] =
          seen ? m[r] + std::log(l[r]) : std::numeric_limits<float>::infinity();
    }
  });
  return ffi::Error::Success();
}

ffi::Error Backward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                    ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::U8> pairs,
                    ffi::Buffer<ffi::S32> offset_class,
                    ffi::Buffer<ffi::F32> lse, ffi::Buffer<ffi::F32> dout,
                    ffi::Buffer<ffi::F32> delta, int64_t block_len, int64_t tile_q,
                    int64_t tile_k, int64_t threads, ffi::ResultBuffer<ffi::F32> dq,
                    ffi::ResultBuffer<ffi::F32> dk, ffi::ResultBuffer<ffi::F32> dv) {
  const Geometry g = geometry(q, k, pairs, block_len, tile_q, tile_k);
  if (auto e = check(g, q, k, v, pairs, offset_class, threads); e.failure()) return e;
  const size_t rows = size_t(g.B * g.H * g.T);
  if (lse.element_count() != rows || delta.element_count() != rows ||
      dout.element_count() != q.element_count())
    return ffi::Error::InvalidArgument(
        "vgpt blockwise CPU kernel: lse and delta must be [B, H, T], dout like q");
  const Visibility vis = visibility(g, pairs.typed_data());
  const int64_t bq = g.bq(), bk = g.bk(), D = g.D, L = g.L, ld = g.row();
  const float *Q = q.typed_data(), *K = k.typed_data(), *V = v.typed_data();
  const float *LSE = lse.typed_data(), *DO = dout.typed_data(), *DELTA = delta.typed_data();
  float *DQ = dq->typed_data(), *DK = dk->typed_data(), *DV = dv->typed_data();
  std::fill(DQ, DQ + dq->element_count(), 0.0f);
  std::vector<std::vector<float>> scratch(std::max<int64_t>(1, threads));

  // One item: a (sample, head) pair, whose kv tiles run FlashAttention-2's backward over the q
  // tiles that see them, recomputing each tile's probabilities from the saved logsumexp. One
  // thread owns a pair's dq, so its sums run in a fixed order: the gradients are bitwise the
  // same from run to run (the training loop's resume equality relies on it), which finer items
  // sharing dq tiles across threads would not give. With fewer pairs than cores, some idle.
  parallel_for(pool, g.B * g.H, threads, [&](int64_t t, int64_t item) {
    const int64_t h = item % g.H, b = item / g.H;
    auto& buf = scratch[t];
    buf.resize(2 * bq * bk + 2 * bk * D + bq * D + bk);
    float *p = buf.data(), *ds = p + bq * bk, *dk_j = ds + bq * bk, *dv_j = dk_j + bk * D,
          *dq_r = dv_j + bk * D, *bias = dq_r + bq * D;
    for (int64_t j = 0; j < g.nk(); ++j) {
      std::fill(dk_j, dk_j + 2 * bk * D, 0.0f);
      const float* k_j = K + ((b * g.S + j * bk) * g.H + h) * D;
      const float* v_j = V + ((b * g.S + j * bk) * g.H + h) * D;
      for (int64_t i = 0; i < g.nq(); ++i) {
        for_each_rectangle(g, vis, b, i, j, [&](int64_t qb, int64_t nqb, int64_t cb,
                                               int64_t ncb, bool masked) {
          const int64_t r0 = i * bq + qb * L, nr = nqb * L, c0 = cb * L, nc = ncb * L;
          const float* q_r = Q + ((b * g.T + r0) * g.H + h) * D;
          const float* do_r = DO + ((b * g.T + r0) * g.H + h) * D;
          const float* lse_r = LSE + (b * g.H + h) * g.T + r0;
          const float* delta_r = DELTA + (b * g.H + h) * g.T + r0;
          const float *k_c = k_j + c0 * ld, *v_c = v_j + c0 * ld;
          float *dk_c = dk_j + c0 * D, *dv_c = dv_j + c0 * D;
          gemm(false, true, nr, nc, D, q_r, ld, k_c, ld, 0.0f, p, nc);
          if (masked)
            apply_mask(g, pairs.typed_data(), offset_class.typed_data(), b, r0 / L, nqb,
                       j * g.tile_k + cb, ncb, p, nc, bias);
          for (int64_t r = 0; r < nr; ++r) {
            float* pr = p + r * nc;
            const float lr = lse_r[r];
#pragma omp simd
            for (int64_t x = 0; x < nc; ++x) pr[x] = exp_nonpositive(pr[x] - lr);
          }
          gemm(true, false, nc, D, nr, p, nc, do_r, ld, 1.0f, dv_c, D);     // dv += p^T do
          gemm(false, true, nr, nc, D, do_r, ld, v_c, ld, 0.0f, ds, nc);    // dp = do v^T
          for (int64_t r = 0; r < nr; ++r) {
            const float dr = delta_r[r];
            float *dsr = ds + r * nc, *pr = p + r * nc;
#pragma omp simd
            for (int64_t x = 0; x < nc; ++x) dsr[x] = pr[x] * (dsr[x] - dr);  // p (dp - delta)
          }
          gemm(true, false, nc, D, nr, ds, nc, q_r, ld, 1.0f, dk_c, D);     // dk += ds^T q
          gemm(false, false, nr, D, nc, ds, nc, k_c, ld, 0.0f, dq_r, D);    // dq_r = ds k
          for (int64_t r = 0; r < nr; ++r) {
            float* dst = DQ + ((b * g.T + r0 + r) * g.H + h) * D;
            for (int64_t d = 0; d < D; ++d) dst[d] += dq_r[r * D + d];
          }
        });
      }
      for (int64_t r = 0; r < bk; ++r) {
        const int64_t at = ((b * g.S + j * bk + r) * g.H + h) * D;
        std::memcpy(DK + at, dk_j + r * D, D * sizeof(float));
        std::memcpy(DV + at, dv_j + r * D, D * sizeof(float));
      }
    }
  });
  return ffi::Error::Success();
}

}  // namespace

extern "C" void vgpt_set_sgemm(void* sgemm) { g_sgemm = reinterpret_cast<Sgemm>(sgemm); }

namespace {

using F32 = ffi::Buffer<ffi::F32>;

// The operands both handlers start with: q, k, v, pairs, offset_class.
auto BindTiles() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .Arg<F32>()
      .Arg<F32>()
      .Arg<F32>()
      .Arg<ffi::Buffer<ffi::U8>>()
      .Arg<ffi::Buffer<ffi::S32>>();
}

// The attributes both handlers take after their operands.
template <typename Binding>
auto WithAttrs(Binding binding) {
  return std::move(binding)
      .template Attr<int64_t>("block_len")
      .template Attr<int64_t>("tile_q")
      .template Attr<int64_t>("tile_k")
      .template Attr<int64_t>("threads");
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(VgptBlockwiseForward, Forward,
                              WithAttrs(BindTiles()).Ret<F32>().Ret<F32>());

// The backward's extra operands: lse, dout, delta.
XLA_FFI_DEFINE_HANDLER_SYMBOL(VgptBlockwiseBackward, Backward,
                              WithAttrs(BindTiles().Arg<F32>().Arg<F32>().Arg<F32>())
                                  .Ret<F32>()
                                  .Ret<F32>()
                                  .Ret<F32>());
