// Shared pieces of the fused CPU vRoPE attention kernels (forward and backward):
// SIMD helpers, the tile gemm, rotation tables, the pitch bias, masks and input checks.
// One way to do each thing, so the two passes agree bit for bit on what they recompute.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
// SLEEF's vector exp/sin/cos (1 ulp), which libtorch_cpu exports and torch's own CPU kernels use.
#include <sleef.h>
#define VROPE_AVX2 1
#endif

namespace vrope {

// Flash-style tiles: 64 query rows against 128 keys (against 64 keys the per-row work of
// each tile, horizontal max and sum, rescaling, cost the forward 3-4% more at T = 512-1024).
// Widths of every tile buffer are padded to kPad (two AVX2 float vectors) so the SIMD loops
// need no tails.
constexpr int64_t kBlockQ = 64;
constexpr int64_t kBlockK = 128;
constexpr int64_t kPad = 16;
constexpr int64_t kRows = 4;  // tile row counts are padded to this (zero rows)

enum BiasKind : int64_t { kBiasNone = 0, kBiasExp = 1, kBiasL1 = 2 };

// ECHO_KERNELS_POISON=1, the project's switch (shared with the Triton backend): output
// buffers are NaN-filled before the kernels write them, so an element that a kernel
// forgets to write shows up as NaN instead of a plausible zero. Read on every call (it is
// one getenv per kernel launch) so that tests can flip it at run time.
inline bool poisoning() {
  const char* v = std::getenv("ECHO_KERNELS_POISON");
  return v != nullptr && std::strcmp(v, "1") == 0;
}

// An uninitialised output buffer, NaN-filled when poisoning: the kernel must write all of it.
inline at::Tensor new_output(at::IntArrayRef sizes, const at::TensorOptions& opts, bool poison) {
  at::Tensor t = at::empty(sizes, opts);
  if (poison) t.fill_(std::numeric_limits<double>::quiet_NaN());
  return t;
}

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }
inline int64_t ceil_div(int64_t x, int64_t m) { return (x + m - 1) / m; }

// Runs tasks [0, n) on at::parallel_for's threads, handed out in order from a shared counter
// in batches that shrink as the work runs out (guided scheduling): a thread on a busier core,
// or with costlier tasks (causal rows, longer lengths), takes fewer of them instead of
// holding the others at the end, as a static split of [0, n) does. Each thread makes one
// task object (make_task(), its caches) and calls run(task, t) for the tasks it takes, so
// results must not depend on which thread runs a task (the kernels' caches are pure functions
// of what they cache; every task writes its own outputs).
template <typename MakeTask, typename Run>
void parallel_tasks(int64_t n, const MakeTask& make_task, const Run& run) {
  if (n <= 0) return;
  const int64_t threads = std::clamp<int64_t>(at::get_num_threads(), 1, n);
  std::atomic<int64_t> next{0};
  // One index per thread; nested in another parallel region, a single call runs them all.
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    auto task = make_task();
    int64_t start = next.load(std::memory_order_relaxed);
    for (;;) {
      if (start >= n) return;
      const int64_t take = std::max<int64_t>((n - start) / (2 * threads), 1);
      if (!next.compare_exchange_weak(start, start + take, std::memory_order_relaxed)) continue;
      for (int64_t t = start, end = std::min(n, start + take); t < end; ++t) run(task, t);
      start = next.load(std::memory_order_relaxed);
    }
  });
}

template <typename T>
constexpr T neg_inf() { return -std::numeric_limits<T>::infinity(); }

// ---------------------------------------------------------------------------------
// SIMD vector: one lane generic fallback, AVX2 specialisations for float and double.
// ---------------------------------------------------------------------------------
template <typename T>
struct Vec {
  static constexpr int64_t size = 1;
  T v;
  static Vec load(const T* p) { return {*p}; }
  static Vec set1(T x) { return {x}; }
  void store(T* p) const { *p = v; }
  friend Vec operator+(Vec a, Vec b) { return {a.v + b.v}; }
  friend Vec operator-(Vec a, Vec b) { return {a.v - b.v}; }
  friend Vec operator*(Vec a, Vec b) { return {a.v * b.v}; }
  friend Vec fmadd(Vec a, Vec b, Vec c) { return {std::fma(a.v, b.v, c.v)}; }
  friend Vec vmax(Vec a, Vec b) { return {a.v > b.v ? a.v : b.v}; }
  friend Vec vmin(Vec a, Vec b) { return {a.v < b.v ? a.v : b.v}; }
  Vec abs() const { return {std::abs(v)}; }
  Vec sign() const { return {T((v > T(0)) - (v < T(0)))}; }
  Vec exp() const { return {std::exp(v)}; }
  T sum() const { return v; }
  T max_lane() const { return v; }
};

#ifdef VROPE_AVX2
// exp on 8 floats: n = round(x / ln2), r = x - n ln2 (two-part ln2), exp(r) by a degree-6
// polynomial fitted for least maximum relative error on |r| <= ln2 / 2 (3e-9, below float
// rounding: 0.52 ulp in float32 arithmetic, as the degree-7 Taylor series it replaced), times
// 2^n. Inputs at or below -88 (-inf included) give n = -127, whose 2^n has a zero exponent
// field: exactly 0, so masked scores contribute nothing without a compare and a mask.
inline __m256 exp_ps(__m256 x) {
  x = _mm256_max_ps(_mm256_min_ps(x, _mm256_set1_ps(88.3f)), _mm256_set1_ps(-88.0f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145751953125f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.428606820309417e-06f), r);
  __m256 p = _mm256_set1_ps(1.381459413e-03f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.368707262e-03f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.166838899e-02f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.666652113e-01f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.999999404e-01f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

template <>
struct Vec<float> {
  static constexpr int64_t size = 8;
  __m256 v;
  static Vec load(const float* p) { return {_mm256_loadu_ps(p)}; }
  static Vec set1(float x) { return {_mm256_set1_ps(x)}; }
  void store(float* p) const { _mm256_storeu_ps(p, v); }
  friend Vec operator+(Vec a, Vec b) { return {_mm256_add_ps(a.v, b.v)}; }
  friend Vec operator-(Vec a, Vec b) { return {_mm256_sub_ps(a.v, b.v)}; }
  friend Vec operator*(Vec a, Vec b) { return {_mm256_mul_ps(a.v, b.v)}; }
  friend Vec fmadd(Vec a, Vec b, Vec c) { return {_mm256_fmadd_ps(a.v, b.v, c.v)}; }
  friend Vec vmax(Vec a, Vec b) { return {_mm256_max_ps(a.v, b.v)}; }
  friend Vec vmin(Vec a, Vec b) { return {_mm256_min_ps(a.v, b.v)}; }
  Vec abs() const { return {_mm256_andnot_ps(_mm256_set1_ps(-0.0f), v)}; }
  Vec sign() const {
    const __m256 zero = _mm256_setzero_ps(), one = _mm256_set1_ps(1.0f);
    const __m256 pos = _mm256_and_ps(_mm256_cmp_ps(v, zero, _CMP_GT_OQ), one);
    const __m256 neg = _mm256_and_ps(_mm256_cmp_ps(v, zero, _CMP_LT_OQ), one);
    return {_mm256_sub_ps(pos, neg)};
  }
  Vec exp() const { return {exp_ps(v)}; }
  // Horizontal reductions in a fixed lane order (determinism does not depend on it,
  // but readers can reproduce it).
  float sum() const {
    alignas(32) float t[8];
    _mm256_store_ps(t, v);
    float s = t[0];
    for (int i = 1; i < 8; ++i) s += t[i];
    return s;
  }
  float max_lane() const {
    alignas(32) float t[8];
    _mm256_store_ps(t, v);
    float m = t[0];
    for (int i = 1; i < 8; ++i) m = std::max(m, t[i]);
    return m;
  }
};

template <>
struct Vec<double> {
  static constexpr int64_t size = 4;
  __m256d v;
  static Vec load(const double* p) { return {_mm256_loadu_pd(p)}; }
  static Vec set1(double x) { return {_mm256_set1_pd(x)}; }
  void store(double* p) const { _mm256_storeu_pd(p, v); }
  friend Vec operator+(Vec a, Vec b) { return {_mm256_add_pd(a.v, b.v)}; }
  friend Vec operator-(Vec a, Vec b) { return {_mm256_sub_pd(a.v, b.v)}; }
  friend Vec operator*(Vec a, Vec b) { return {_mm256_mul_pd(a.v, b.v)}; }
  friend Vec fmadd(Vec a, Vec b, Vec c) { return {_mm256_fmadd_pd(a.v, b.v, c.v)}; }
  friend Vec vmax(Vec a, Vec b) { return {_mm256_max_pd(a.v, b.v)}; }
  friend Vec vmin(Vec a, Vec b) { return {_mm256_min_pd(a.v, b.v)}; }
  Vec abs() const { return {_mm256_andnot_pd(_mm256_set1_pd(-0.0), v)}; }
  Vec sign() const {
    const __m256d zero = _mm256_setzero_pd(), one = _mm256_set1_pd(1.0);
    const __m256d pos = _mm256_and_pd(_mm256_cmp_pd(v, zero, _CMP_GT_OQ), one);
    const __m256d neg = _mm256_and_pd(_mm256_cmp_pd(v, zero, _CMP_LT_OQ), one);
    return {_mm256_sub_pd(pos, neg)};
  }
  // float64 is the exact (golden-speed) path: libm exp per lane.
  Vec exp() const {
    alignas(32) double t[4];
    _mm256_store_pd(t, v);
    for (double& x : t) x = std::exp(x);
    return {_mm256_load_pd(t)};
  }
  double sum() const {
    alignas(32) double t[4];
    _mm256_store_pd(t, v);
    return ((t[0] + t[1]) + t[2]) + t[3];
  }
  double max_lane() const {
    alignas(32) double t[4];
    _mm256_store_pd(t, v);
    return std::max(std::max(t[0], t[1]), std::max(t[2], t[3]));
  }
};
#endif  // VROPE_AVX2

// ---------------------------------------------------------------------------------
// Tile gemm: C[M, N] (+)= A[M, K] * B[K, N], B and C row-major with leading dimensions;
// element (r, p) of A at A[r * a_row + p * a_col], so A may be read transposed in place
// (gemm_at) instead of being copied. N must be a multiple of 2 * Vec<T>::size (callers pad
// tiles to kPad). A register tile of R rows x NV vectors accumulates over K in a fixed order,
// so every element gets the same sum whatever the tiling. R = 6, NV = 2: 12 accumulators hide
// the FMA latency and fit the 16 AVX2 registers with the B vectors and the A broadcast; fewer
// rows take more vectors (a decoding step's single query row would otherwise wait on two
// dependent FMA chains).
// ---------------------------------------------------------------------------------
template <typename T, int64_t R, int64_t NV>
inline void gemm_tile(int64_t j, int64_t K, const T* A, int64_t a_row, int64_t a_col, const T* B, int64_t ldb, T* C,
                      int64_t ldc, bool accumulate) {
  using V = Vec<T>;
  constexpr int64_t W = V::size;
  V c[R][NV];
  for (int64_t r = 0; r < R; ++r)
    for (int64_t u = 0; u < NV; ++u) c[r][u] = accumulate ? V::load(C + r * ldc + j + u * W) : V::set1(T(0));
  for (int64_t p = 0; p < K; ++p) {
    V b[NV];
    for (int64_t u = 0; u < NV; ++u) b[u] = V::load(B + p * ldb + j + u * W);
    const T* a = A + p * a_col;
    for (int64_t r = 0; r < R; ++r) {
      const V ar = V::set1(a[r * a_row]);
      for (int64_t u = 0; u < NV; ++u) c[r][u] = fmadd(ar, b[u], c[r][u]);
    }
  }
  for (int64_t r = 0; r < R; ++r)
    for (int64_t u = 0; u < NV; ++u) c[r][u].store(C + r * ldc + j + u * W);
}

template <typename T, int64_t R>
inline void gemm_rows(int64_t N, int64_t K, const T* A, int64_t a_row, int64_t a_col, const T* B, int64_t ldb,
                      T* C, int64_t ldc, bool accumulate) {
  constexpr int64_t W = Vec<T>::size, NV = R == 1 ? 8 : R == 2 ? 4 : 2;
  int64_t j = 0;
  for (; j + NV * W <= N; j += NV * W) gemm_tile<T, R, NV>(j, K, A, a_row, a_col, B, ldb, C, ldc, accumulate);
  for (; j < N; j += 2 * W) gemm_tile<T, R, 2>(j, K, A, a_row, a_col, B, ldb, C, ldc, accumulate);
}

template <typename T>
void gemm_strided(int64_t M, int64_t N, int64_t K, const T* A, int64_t a_row, int64_t a_col, const T* B,
                  int64_t ldb, T* C, int64_t ldc, bool accumulate) {
  int64_t i = 0;
  for (; i + 6 <= M; i += 6)
    gemm_rows<T, 6>(N, K, A + i * a_row, a_row, a_col, B, ldb, C + i * ldc, ldc, accumulate);
  const T* a = A + i * a_row;
  T* c = C + i * ldc;
  switch (M - i) {
    case 5: gemm_rows<T, 5>(N, K, a, a_row, a_col, B, ldb, c, ldc, accumulate); break;
    case 4: gemm_rows<T, 4>(N, K, a, a_row, a_col, B, ldb, c, ldc, accumulate); break;
    case 3: gemm_rows<T, 3>(N, K, a, a_row, a_col, B, ldb, c, ldc, accumulate); break;
    case 2: gemm_rows<T, 2>(N, K, a, a_row, a_col, B, ldb, c, ldc, accumulate); break;
    case 1: gemm_rows<T, 1>(N, K, a, a_row, a_col, B, ldb, c, ldc, accumulate); break;
    default: break;
  }
}

// A row-major [M, K] with leading dimension lda.
template <typename T>
void gemm(int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* B, int64_t ldb, T* C, int64_t ldc,
          bool accumulate) {
  gemm_strided(M, N, K, A, lda, 1, B, ldb, C, ldc, accumulate);
}

// C[M, N] (+)= At^T * B with At row-major [K, M] (leading dimension ld_at): the backward's
// P^T dO and dS^T Q straight from the [queries, keys] tiles.
template <typename T>
void gemm_at(int64_t M, int64_t N, int64_t K, const T* At, int64_t ld_at, const T* B, int64_t ldb, T* C,
             int64_t ldc, bool accumulate) {
  gemm_strided(M, N, K, At, 1, ld_at, B, ldb, C, ldc, accumulate);
}

// ---------------------------------------------------------------------------------
// Row helpers of the softmax and its backward (width n a multiple of kPad).
// ---------------------------------------------------------------------------------
template <typename T>
T row_max(const T* x, int64_t n) {
  using V = Vec<T>;
  V m = V::set1(neg_inf<T>());
  for (int64_t j = 0; j < n; j += V::size) m = vmax(m, V::load(x + j));
  return m.max_lane();
}

// x[j] = exp(x[j] - shift) in place; returns the sum of the new values.
template <typename T>
T exp_row(T* x, int64_t n, T shift) {
  using V = Vec<T>;
  const V s = V::set1(shift);
  V acc = V::set1(T(0));
  for (int64_t j = 0; j < n; j += V::size) {
    const V e = (V::load(x + j) - s).exp();
    e.store(x + j);
    acc = acc + e;
  }
  return acc.sum();
}

template <typename T>
void scale_row(T* x, int64_t n, T factor) {
  using V = Vec<T>;
  const V f = V::set1(factor);
  for (int64_t j = 0; j < n; j += V::size) (V::load(x + j) * f).store(x + j);
}

// Keys j in [limit, n) are not allowed: their score becomes -inf.
template <typename T>
void mask_row(T* s, int64_t limit, int64_t n) {
  for (int64_t j = std::max<int64_t>(limit, 0); j < n; ++j) s[j] = neg_inf<T>();
}

template <typename T>
T dot_row(const T* a, const T* b, int64_t n) {
  using V = Vec<T>;
  V acc = V::set1(T(0));
  for (int64_t j = 0; j < n; j += V::size) acc = fmadd(V::load(a + j), V::load(b + j), acc);
  return acc.sum();
}

// ---------------------------------------------------------------------------------
// Pitch bias of one query token against a key tile.
//
// The exp kind factorises: exp(-beta |p_i - p_j|) = min(e_i^- e_j^+, e_i^+ e_j^-) with
// e^+ = exp(beta p), e^- = exp(-beta p) per token (the right product is the one <= 1), so
// a score costs two products and a min instead of an exp. The factors' arguments carry a
// rounding error of |beta p| ulp, so the product is used only while beta max|p| <= kExpFactorLimit
// (an error below 16 ulp of the bias; z-scored pitch with beta near 1 stays far under it);
// beyond, the exp is taken per score.
// ---------------------------------------------------------------------------------
constexpr double kExpFactorLimit = 8.0;

// Per-key inputs of the bias over a tile, padded with finite values to the tile width.
template <typename T>
struct KeyPitch {
  const T* pitch;
  const T* voiced;
  const T* up;    // exp(beta p_j), or nullptr when the exp is taken per score
  const T* down;  // exp(-beta p_j)
};

template <typename T>
struct BiasRow {
  int64_t kind;
  T alpha, beta, pq, vq;  // head weight, beta, the query token's pitch and voicing
  T up, down;             // exp(+-beta pq) (used with the keys' factors)
  bool active() const { return kind != kBiasNone && vq != T(0); }
};

// The bias of query row br against keys [j, j + W) before voicing, with pdiff = pq - pk:
// exp kind alpha t with t = exp(-beta |pdiff|) (returned in t: dS's factor in the gradients),
// l1 kind -alpha beta |pdiff|.
template <typename T>
inline Vec<T> bias_term(const BiasRow<T>& br, const KeyPitch<T>& keys, int64_t j, Vec<T> pdiff, Vec<T>& t) {
  using V = Vec<T>;
  if (br.kind == kBiasExp) {
    t = keys.up != nullptr ? vmin(V::set1(br.down) * V::load(keys.up + j), V::set1(br.up) * V::load(keys.down + j))
                           : (V::set1(-br.beta) * pdiff.abs()).exp();
    return V::set1(br.alpha) * t;
  }
  return V::set1(-br.alpha * br.beta) * pdiff.abs();
}

// s[j] += bias(i, j) over a row of n keys.
template <typename T>
void add_bias_row(const BiasRow<T>& br, const KeyPitch<T>& keys, int64_t n, T* s) {
  using V = Vec<T>;
  const V pq = V::set1(br.pq), vq = V::set1(br.vq);
  for (int64_t j = 0; j < n; j += V::size) {
    V t = V::set1(T(0));  // set by the exp kind only
    const V add = bias_term(br, keys, j, pq - V::load(keys.pitch + j), t);
    (V::load(s + j) + add * (vq * V::load(keys.voiced + j))).store(s + j);
  }
}

// Sums over one row of the bias gradient pieces, with w = dS * (exp term) * voiced_i voiced_j:
// sum w, sum w |pq - pk|, sum w sign(pq - pk) (sign(0) = 0, as torch.abs' derivative).
template <typename T>
struct BiasRowGrads {
  T w = 0, w_dist = 0, w_sign = 0;
  BiasRowGrads& operator+=(const BiasRowGrads& o) {
    w += o.w;
    w_dist += o.w_dist;
    w_sign += o.w_sign;
    return *this;
  }
};

// One backward row in one pass over n keys: s holds the masked scores (-inf where not
// allowed) and becomes P = exp(s + bias - lse); dp holds dP and becomes dS = P (dP - delta).
// With `biased`, returns the row's bias gradient pieces and adds w sign(pq - pk) per key to
// col (the key-side pitch gradient). The row stays in registers between the steps.
template <typename T>
BiasRowGrads<T> probs_grads_row(const BiasRow<T>& br, bool biased, const KeyPitch<T>& keys, int64_t n, T lse,
                                T delta, T* s, T* dp, T* col) {
  using V = Vec<T>;
  const V shift = V::set1(lse), d = V::set1(delta);
  if (!biased) {
    for (int64_t j = 0; j < n; j += V::size) {
      const V p = (V::load(s + j) - shift).exp();
      p.store(s + j);
      (p * (V::load(dp + j) - d)).store(dp + j);
    }
    return {};
  }
  const V pq = V::set1(br.pq), vq = V::set1(br.vq);
  const bool exp_kind = br.kind == kBiasExp;
  V w_sum = V::set1(T(0)), wd_sum = w_sum, ws_sum = w_sum;
  for (int64_t j = 0; j < n; j += V::size) {
    const V pdiff = pq - V::load(keys.pitch + j);
    const V voiced = vq * V::load(keys.voiced + j);
    V t = V::set1(T(0));  // set by the exp kind only
    const V add = bias_term(br, keys, j, pdiff, t);
    const V p = ((V::load(s + j) + add * voiced) - shift).exp();
    p.store(s + j);
    const V ds = p * (V::load(dp + j) - d);
    ds.store(dp + j);
    const V w = (exp_kind ? ds * t : ds) * voiced;
    const V ws = w * pdiff.sign();
    w_sum = w_sum + w;
    wd_sum = wd_sum + w * pdiff.abs();
    ws_sum = ws_sum + ws;
    (V::load(col + j) + ws).store(col + j);
  }
  return {w_sum.sum(), wd_sum.sum(), ws_sum.sum()};
}

// ---------------------------------------------------------------------------------
// Problem description, per-side features and rotation tables.
// ---------------------------------------------------------------------------------
struct Shape {
  int64_t B, H, Hk, G, Tq, Tk, D, P, Dp;
};

// Rows of k or v [B, Hk, Tk, D] (data) of key/value head hk of batch row b, from key j on.
template <typename T>
inline const T* kv_rows(const T* data, const Shape& s, int64_t b, int64_t hk, int64_t j) {
  return data + ((b * s.Hk + hk) * s.Tk + j) * s.D;
}

// One side's features [B, T], its rotation tables cos/sin/phi [B, T, P] and, for the
// factorised exp bias, exp(+-beta pitch) [B, T], computed once per call (not per score,
// not per tile) in the stat dtype.
template <typename acc_t>
struct Side {
  const acc_t *pos, *log_theta, *radius, *pitch, *voiced;
  at::Tensor tables;  // [3, B, T, P]: cos, sin, phi
  const acc_t *cos, *sin, *phi;
  at::Tensor factors;                          // [2, B, T]: up, down (when factorised)
  const acc_t *up = nullptr, *down = nullptr;  // exp(beta pitch), exp(-beta pitch)
  int64_t T, P;
  int64_t token(int64_t b, int64_t t) const { return b * T + t; }
  int64_t pair(int64_t b, int64_t t) const { return (b * T + t) * P; }
};

// One token's rotation: angle_m = pos * exp(-(2m / D) * log_theta) and its cos and sin, m < P,
// in the reference's operation order. float32 is vectorised over m with SLEEF where AVX2 is: a
// decoding step against a long key cache spent most of its time here (Tq = 1, Tk = 4096: 3.9 ms
// of scalar exp/cos/sin on two threads, 1.6-2.0 ms now). float64, the fast golden, keeps libm's
// functions (SLEEF's 1-ulp bound took its largest error against the dense float64 form from
// 6.4e-16 to 9.3e-16 at T = 2048).
template <typename acc_t>
inline void rotation_row(acc_t pos, acc_t lt, int64_t P, int64_t D, acc_t* phi, acc_t* cos, acc_t* sin) {
  int64_t m = 0;
#ifdef VROPE_AVX2
  if constexpr (std::is_same_v<acc_t, float>) {
    const __m256 two_m0 = _mm256_setr_ps(0, 2, 4, 6, 8, 10, 12, 14);
    for (; m + 8 <= P; m += 8) {
      // 2m is exact in float, and IEEE division rounds as the scalar acc_t(2m) / acc_t(D).
      const __m256 coef = _mm256_div_ps(_mm256_add_ps(two_m0, _mm256_set1_ps(float(2 * m))), _mm256_set1_ps(float(D)));
      const __m256 arg = _mm256_mul_ps(_mm256_sub_ps(_mm256_setzero_ps(), coef), _mm256_set1_ps(lt));
      const __m256 angle = _mm256_mul_ps(_mm256_set1_ps(pos), Sleef_expf8_u10(arg));
      const Sleef___m256_2 sc = Sleef_sincosf8_u10(angle);
      _mm256_storeu_ps(phi + m, angle);
      _mm256_storeu_ps(sin + m, sc.x);
      _mm256_storeu_ps(cos + m, sc.y);
    }
  }
#endif
  for (; m < P; ++m) {
    const acc_t coef = acc_t(2 * m) / acc_t(D);
    const acc_t angle = pos * std::exp(-coef * lt);
    phi[m] = angle;
    cos[m] = std::cos(angle);
    sin[m] = std::sin(angle);
  }
}

// beta_factors: the beta of the factorised exp bias, or NaN for none.
template <typename acc_t>
Side<acc_t> make_side(const std::vector<at::Tensor>& f, int64_t B, int64_t T, int64_t D, double beta_factors) {
  Side<acc_t> s;
  s.pos = f[0].data_ptr<acc_t>();
  s.log_theta = f[1].data_ptr<acc_t>();
  s.radius = f[2].data_ptr<acc_t>();
  s.pitch = f[3].data_ptr<acc_t>();
  s.voiced = f[4].data_ptr<acc_t>();
  s.T = T;
  s.P = D / 2;
  const int64_t P = s.P, n_tok = B * T;
  at::Tensor tables = at::empty({3, n_tok, P}, f[0].options());
  s.tables = tables;
  acc_t* cos = tables.data_ptr<acc_t>();
  acc_t* sin = cos + n_tok * P;
  acc_t* phi = sin + n_tok * P;
  const acc_t* pos = s.pos;
  const acc_t* lt = s.log_theta;
  const bool factorised = !std::isnan(beta_factors);
  acc_t* up = nullptr;
  acc_t* down = nullptr;
  if (factorised) {
    s.factors = at::empty({2, n_tok}, f[0].options());
    up = s.factors.template data_ptr<acc_t>();
    down = up + n_tok;
  }
  const acc_t beta = factorised ? static_cast<acc_t>(beta_factors) : acc_t(0);
  // (No tensor ops: at short lengths this setup is a visible part of a call.)
  at::parallel_for(0, n_tok, 256, [&](int64_t lo, int64_t hi) {
    for (int64_t t = lo; t < hi; ++t) {
      rotation_row(pos[t], lt[t], P, D, phi + t * P, cos + t * P, sin + t * P);
      if (factorised) {
        const acc_t scaled = s.pitch[t] * beta;
        up[t] = std::exp(scaled);
        down[t] = std::exp(-scaled);
      }
    }
  });
  s.cos = cos;
  s.sin = sin;
  s.phi = phi;
  s.up = up;
  s.down = down;
  return s;
}

// The bias inputs of query token t (batch-flat index) for head weight alpha.
template <typename acc_t>
BiasRow<acc_t> make_bias_row(int64_t kind, acc_t alpha, acc_t beta, const Side<acc_t>& side, int64_t t) {
  const bool factors = side.up != nullptr;
  return BiasRow<acc_t>{kind,  alpha, beta, side.pitch[t], side.voiced[t], factors ? side.up[t] : acc_t(1),
                        factors ? side.down[t] : acc_t(1)};
}

// One thread's copy of a (b, hk) sequence's key-side bias inputs (pitch, voicing and, when
// factorised, exp(+-beta pitch)), padded to whole key tiles with finite zeros: keys past Lk
// are masked, but their products must not be NaN. Shared by forward and backward so that
// both recompute the same bias.
template <typename T>
class KeyPitchCache {
 public:
  KeyPitchCache(int64_t Tk, bool factorised)
      : pitch_(round_up(Tk, kBlockK), T(0)), voiced_(pitch_.size(), T(0)), up_(factorised ? pitch_.size() : 0, T(0)),
        down_(up_.size(), T(0)), tile_voiced_(ceil_div(Tk, kBlockK), 0) {}

  void load(const Side<T>& side, int64_t b, int64_t lk) {
    for (int64_t j = 0; j < lk; ++j) {
      const int64_t t = side.token(b, j);
      pitch_[j] = side.pitch[t];
      voiced_[j] = side.voiced[t];
      if (!up_.empty()) {
        up_[j] = side.up[t];
        down_[j] = side.down[t];
      }
    }
    for (auto* v : {&pitch_, &voiced_, &up_, &down_})
      if (!v->empty()) std::fill(v->begin() + lk, v->end(), T(0));
    for (size_t kb = 0; kb < tile_voiced_.size(); ++kb) {
      const auto first = voiced_.begin() + kb * kBlockK;
      tile_voiced_[kb] = std::any_of(first, first + kBlockK, [](T x) { return x != T(0); });
    }
  }

  // The keys of the tile starting at key j0.
  KeyPitch<T> tile(int64_t j0) const {
    const bool factorised = !up_.empty();
    return KeyPitch<T>{pitch_.data() + j0, voiced_.data() + j0, factorised ? up_.data() + j0 : nullptr,
                       factorised ? down_.data() + j0 : nullptr};
  }

  // Some key of the tile starting at j0 is voiced (else the pitch bias is 0 on the whole tile).
  bool tile_voiced(int64_t j0) const { return tile_voiced_[j0 / kBlockK] != 0; }

 private:
  std::vector<T> pitch_, voiced_, up_, down_;  // up_, down_: empty unless factorised
  std::vector<char> tile_voiced_;
};

// Rotates token row x (interleaved pairs, length 2P) into split layout (even results at
// 0..P-1, odd at P..2P-1), scaled by r * mult; element c goes to out[c * stride].
template <typename scalar_t, typename acc_t>
void rotate_row(const scalar_t* x, const acc_t* c, const acc_t* s, acc_t r, acc_t mult, int64_t P, acc_t* out,
                int64_t stride) {
  const acc_t rm = r * mult;
  for (int64_t m = 0; m < P; ++m) {
    const acc_t xe = static_cast<acc_t>(x[2 * m]), xo = static_cast<acc_t>(x[2 * m + 1]);
    out[m * stride] = rm * (xe * c[m] - xo * s[m]);
    out[(P + m) * stride] = rm * (xe * s[m] + xo * c[m]);
  }
}

// Asks for rows [0, n) of x (ld elements apart, width elements each) to be cached: rows
// read in column chunks (the value product) or 8 at a time (key rotation) defeat the
// hardware prefetcher, and a long key cache comes from memory on every call.
template <typename T>
inline void prefetch_rows(const T* x, int64_t n, int64_t ld, int64_t width) {
  constexpr int64_t line = 64 / sizeof(T);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t e = 0; e < width; e += line) __builtin_prefetch(x + i * ld + e);
}

#ifdef VROPE_AVX2
// Transposes the 8 x 8 floats r[0..7] (row i in r[i]) in place.
inline void transpose8(__m256 r[8]) {
  __m256 t[8], u[8];
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);      // a0 b0 a1 b1 | a4 b4 a5 b5
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);  // a2 b2 a3 b3 | a6 b6 a7 b7
  }
  for (int i = 0; i < 8; i += 4) {
    u[i] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(1, 0, 1, 0));  // a0 b0 c0 d0 | a4 b4 c4 d4
    u[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(3, 2, 3, 2));
    u[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(1, 0, 1, 0));
    u[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x20);
    r[i + 4] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x31);
  }
}

// 8 consecutive elements as floats (exact for every input type the kernels take).
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const at::BFloat16* p) {
  // A bfloat16 is the high half of the float with the same bits.
  const __m128i bits = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(bits), 16));
}
inline __m256 load8(const at::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
#endif

// Rotates n consecutive tokens' rows as rotate_row (unit multiplier) and stores them transposed:
// element d (split layout) of row c goes to out[d * ld_out + c], the layout of the score tiles'
// right operand. Row c is x + c * ld_x, its tables cos/sin + c * P, its radius radius[c].
// With AVX2 and float accumulation (float32, bfloat16 and float16 inputs) it takes 8 rows at a
// time, transposed in registers: the same products bit for bit, without rotate_row's 2P scalar
// stores one row of out apart (the strided stores were most of the cost of a decoding step
// against a long cache).
template <typename scalar_t, typename acc_t>
void rotate_rows_transposed(int64_t n, const scalar_t* x, int64_t ld_x, const acc_t* cos, const acc_t* sin,
                            const acc_t* radius, int64_t P, acc_t* out, int64_t ld_out) {
  int64_t c = 0;
#ifdef VROPE_AVX2
  if constexpr (std::is_same_v<acc_t, float>) {
    for (; P % 8 == 0 && c + 8 <= n; c += 8) {
      // The next block's rows: their loads otherwise wait on memory (most of this loop's time
      // against a long key cache, which is read once per call).
      const int64_t ahead = std::min<int64_t>(8, n - c - 8);
      if (ahead > 0) prefetch_rows(x + (c + 8) * ld_x, ahead, ld_x, 2 * P);
      const __m256 r = _mm256_loadu_ps(radius + c);
      for (int64_t m0 = 0; m0 < P; m0 += 8) {
        // Rows in lanes after the transposes: pairs[h][2u] / [2u + 1] hold the even / odd
        // element of pair m0 + 4h + u; cs[u], sn[u] the cos and sin of pair m0 + u.
        __m256 pairs[2][8], cs[8], sn[8];
        for (int i = 0; i < 8; ++i) {
          const scalar_t* row = x + (c + i) * ld_x + 2 * m0;
          pairs[0][i] = load8(row);
          pairs[1][i] = load8(row + 8);
          cs[i] = _mm256_loadu_ps(cos + (c + i) * P + m0);
          sn[i] = _mm256_loadu_ps(sin + (c + i) * P + m0);
        }
        transpose8(pairs[0]);
        transpose8(pairs[1]);
        transpose8(cs);
        transpose8(sn);
        for (int u = 0; u < 8; ++u) {
          const __m256 xe = pairs[u / 4][2 * (u % 4)], xo = pairs[u / 4][2 * (u % 4) + 1];
          const __m256 e = _mm256_sub_ps(_mm256_mul_ps(xe, cs[u]), _mm256_mul_ps(xo, sn[u]));
          const __m256 o = _mm256_add_ps(_mm256_mul_ps(xe, sn[u]), _mm256_mul_ps(xo, cs[u]));
          _mm256_storeu_ps(out + (m0 + u) * ld_out + c, _mm256_mul_ps(r, e));
          _mm256_storeu_ps(out + (P + m0 + u) * ld_out + c, _mm256_mul_ps(r, o));
        }
      }
    }
  }
#endif
  for (; c < n; ++c) rotate_row(x + c * ld_x, cos + c * P, sin + c * P, radius[c], acc_t(1), P, out + c, ld_out);
}

#ifdef VROPE_AVX2
// Scores of one query row against n keys without rotating the keys. For key pair m (xe, xo,
// interleaved as stored; cos c, sin s, radius r) and the rotated query's pair (ae, ao),
//   ae r (xe c - xo s) + ao r (xe s + xo c) = r [xe (ae c + ao s) + xo (ao c - ae s)],
// so each key turns the query by its own angle, K = qa * (c, c) + qb * (s, s) lane by lane
// with qa = (ae, ao) and qb = (ao, -ae) per pair, and meets its row as it lies in memory: no
// transposes and no rotated copy (a third of the shuffles of rotate_rows_transposed and the
// product after it). For a lone query row: rows that share a key tile rotate it once instead.
// qa, qb: [2P], interleaved like the keys; P % 4 == 0. out[c] = score of key c.
template <typename scalar_t>
void turned_query_scores(int64_t n, const scalar_t* x, int64_t ld_x, const float* cos, const float* sin,
                         const float* radius, int64_t P, const float* qa, const float* qb, float* out) {
  const __m256i dup = _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3);
  for (int64_t c = 0; c < n; c += 8) {
    // A last block of fewer than 8 keys repeats its last key: every key's sum has the same
    // order wherever it falls.
    int64_t row[8];
    for (int i = 0; i < 8; ++i) row[i] = std::min<int64_t>(c + i, n - 1);
    const int64_t ahead = std::min<int64_t>(8, n - c - 8);
    if (ahead > 0) prefetch_rows(x + (c + 8) * ld_x, ahead, ld_x, 2 * P);
    __m256 acc[8];
    for (int i = 0; i < 8; ++i) acc[i] = _mm256_setzero_ps();
    for (int64_t m0 = 0; m0 < P; m0 += 4) {
      const __m256 a = _mm256_loadu_ps(qa + 2 * m0), b = _mm256_loadu_ps(qb + 2 * m0);
      for (int i = 0; i < 8; ++i) {
        const __m256 cc = _mm256_permutevar8x32_ps(_mm256_castps128_ps256(_mm_loadu_ps(cos + row[i] * P + m0)), dup);
        const __m256 ss = _mm256_permutevar8x32_ps(_mm256_castps128_ps256(_mm_loadu_ps(sin + row[i] * P + m0)), dup);
        const __m256 turned = _mm256_fmadd_ps(b, ss, _mm256_mul_ps(a, cc));
        acc[i] = _mm256_fmadd_ps(load8(x + row[i] * ld_x + 2 * m0), turned, acc[i]);
      }
    }
    // Lane sums of the 8 accumulators into one vector (key i in lane i).
    const __m256 t0 = _mm256_hadd_ps(acc[0], acc[1]), t1 = _mm256_hadd_ps(acc[2], acc[3]);
    const __m256 t2 = _mm256_hadd_ps(acc[4], acc[5]), t3 = _mm256_hadd_ps(acc[6], acc[7]);
    const __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);
    const __m256 sums = _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
    float r[8], block[8];
    for (int i = 0; i < 8; ++i) r[i] = radius[row[i]];
    _mm256_storeu_ps(block, _mm256_mul_ps(_mm256_loadu_ps(r), sums));
    std::copy_n(block, std::min<int64_t>(8, n - c), out + c);
  }
}
#endif

// Whether a pass scores keys with turned_query_scores: one query row per (batch, head) and no
// GQA (so no heads packed into taller tiles, whatever the thread count), float sums, P % 4 == 0.
// Forward and backward decide alike, so the backward recomputes the forward's scores bit for bit.
template <typename acc_t>
bool scores_turn_query(const Shape& s) {
#ifdef VROPE_AVX2
  return std::is_same_v<acc_t, float> && s.Tq == 1 && s.G == 1 && s.P % 4 == 0;
#else
  return false;
#endif
}

// The rotated query row q (split layout: even results at 0..P-1, odd at P..2P-1) as
// turned_query_scores takes it: qa = (even, odd) and qb = (odd, -even) per pair.
template <typename acc_t>
void interleave_query(const acc_t* q, int64_t P, acc_t* qa, acc_t* qb) {
  for (int64_t m = 0; m < P; ++m) {
    qa[2 * m] = q[m];
    qa[2 * m + 1] = q[P + m];
    qb[2 * m] = q[P + m];
    qb[2 * m + 1] = -q[m];
  }
}

// Scores of the lone query row (qa, qb from interleave_query) against keys [j0, j0 + n) of batch
// row b: rows x (kv_rows), tables and radius from the key side. Both passes call this, where
// scores_turn_query<acc_t> holds, so the backward recomputes the forward's scores exactly.
template <typename scalar_t, typename acc_t>
void turned_scores(int64_t n, const scalar_t* x, const Side<acc_t>& keys, int64_t b, int64_t j0, const acc_t* qa,
                   const acc_t* qb, acc_t* out) {
#ifdef VROPE_AVX2
  if constexpr (std::is_same_v<acc_t, float>) {
    turned_query_scores(n, x, 2 * keys.P, keys.cos + keys.pair(b, j0), keys.sin + keys.pair(b, j0),
                        keys.radius + keys.token(b, j0), keys.P, qa, qb, out);
    return;
  }
#endif
  TORCH_INTERNAL_ASSERT(false, "turned query scores need AVX2 and float sums");
}

// Copies a row (natural layout) converting to the accumulation type; element c to out[c * stride].
template <typename scalar_t, typename acc_t>
void load_row(const scalar_t* x, int64_t n, acc_t* out, int64_t stride) {
  for (int64_t c = 0; c < n; ++c) out[c * stride] = static_cast<acc_t>(x[c]);
}

// Pulls g = dL/d(rotated row) (split layout, times gscale) back to the input row x, and
// returns the token's radius and log-theta gradients (as chunked.unrotate):
// dr = <g, unit-radius rot(x)>, dphi_m = r <g_m, J rot(x)_m>, dlog_theta = sum_m dphi_m phi_m (-2m / D).
template <typename scalar_t, typename acc_t>
void unrotate_row(const acc_t* g, acc_t gscale, const scalar_t* x, const acc_t* c, const acc_t* s,
                  const acc_t* phi, acc_t r, int64_t P, scalar_t* dx, acc_t& dradius, acc_t& dlog_theta) {
  acc_t dr = 0, dlt = 0;
  const acc_t D = acc_t(2 * P);
  for (int64_t m = 0; m < P; ++m) {
    const acc_t ge = gscale * g[m], go = gscale * g[P + m];
    const acc_t xe = static_cast<acc_t>(x[2 * m]), xo = static_cast<acc_t>(x[2 * m + 1]);
    const acc_t unit_e = xe * c[m] - xo * s[m];
    const acc_t unit_o = xe * s[m] + xo * c[m];
    dr += ge * unit_e + go * unit_o;
    const acc_t dphi = r * (go * unit_e - ge * unit_o);
    dlt += dphi * phi[m] * (acc_t(-2 * m) / D);
    dx[2 * m] = static_cast<scalar_t>(r * (ge * c[m] + go * s[m]));
    dx[2 * m + 1] = static_cast<scalar_t>(r * (go * c[m] - ge * s[m]));
  }
  dradius = dr;
  dlog_theta = dlt;
}

// Number of keys query i may see within a key tile starting at j0 holding n valid keys:
// allowed j < Lk and (causal: j <= i + Lk - Lq). May be <= 0.
inline int64_t key_limit(int64_t i, int64_t j0, int64_t n, int64_t lq, int64_t lk, bool causal) {
  return causal ? std::min(n, i + lk - lq - j0 + 1) : n;
}

// ---------------------------------------------------------------------------------
// Inputs: validation shared by forward and backward.
// ---------------------------------------------------------------------------------
struct Inputs {
  at::Tensor q, k, v;
  std::vector<at::Tensor> fq, fk;
  at::Tensor alpha, beta;
  double beta_value;  // beta read once here, outside the parallel regions (exact for float32 beta)
  double beta_factors;  // beta_value when the exp bias is factorised (see kExpFactorLimit), else NaN
  std::vector<int64_t> lq, lk;
  int64_t bias;
  bool causal;
  bool poison;  // poisoning(), read once per call
  double scale;
  Shape shape;
  at::ScalarType stat;
};

Inputs check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const std::vector<at::Tensor>& fq,
                    const std::vector<at::Tensor>& fk, const at::Tensor& alpha, const at::Tensor& beta,
                    const at::Tensor& q_lengths, const at::Tensor& k_lengths, int64_t bias, bool causal,
                    double scale);

std::vector<at::Tensor> forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                const std::vector<at::Tensor>& fq, const std::vector<at::Tensor>& fk,
                                const at::Tensor& alpha, const at::Tensor& beta, const at::Tensor& q_lengths,
                                const at::Tensor& k_lengths, int64_t bias, bool causal, double scale);

std::vector<at::Tensor> backward(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                                 const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                                 const std::vector<at::Tensor>& fq, const std::vector<at::Tensor>& fk,
                                 const at::Tensor& alpha, const at::Tensor& beta, const at::Tensor& q_lengths,
                                 const at::Tensor& k_lengths, int64_t bias, bool causal, double scale);

}  // namespace vrope
