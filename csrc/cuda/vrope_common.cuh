// Device building blocks shared by the rotation prologue, the forward and the backward
// kernels: one way to do each thing (rotation tables, tile loads, the allowed-mask, the pitch
// bias and its gradient, warp-level tensor-core products), so the kernels cannot drift apart.
//
// Conventions (every kernel):
// * A CTA has kThreads = 128 threads (4 warps) and works on 64-token tiles (kTile); warp w
//   owns rows [16 w, 16 w + 16) of every per-tile matrix it computes (scores, probabilities,
//   accumulators), so only tiles shared by all warps need __syncthreads.
// * q and k are rotated once per launch, before the attention kernels, by the prologue
//   (vrope_rotate.cu) into global scratch (Params::q_rot / k_rot) in the "split" layout:
//   columns [0, P) hold the rotated even elements (2m), columns [P, D) the rotated odd ones
//   (2m + 1). A score is then one dot product over D with no shuffles, and every tile the
//   attention kernels stream is a plain 16-byte-vector copy, with no trig per tile. v, dout,
//   out and every gradient stay in the interleaved (natural) layout.
// * Scores are kept in log2 units (s * log2 e) so the softmax uses exp2; the bias too.
// * Products use WMMA (mma.sync through nvcuda::wmma): 16x16x16 half/bfloat16 fragments with
//   float32 accumulators, operands read from shared memory.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <cstdint>
#include <type_traits>

#include "cuda/vrope_params.h"

namespace echo {
namespace vrope {

constexpr int kThreads = 128;
constexpr int kWarpSize = 32;
constexpr int kWarps = kThreads / kWarpSize;
constexpr int kMma = 16;  // WMMA tile edge (m = n = k = 16)
constexpr int kWarpRows = kMma;  // rows of a tile owned by one warp
constexpr int kTile = kWarps * kWarpRows;  // tokens per query or key tile (64)
constexpr int kHalfCols = kTile / 2;  // columns of a score row handled by one lane (two lanes per row)
// Shared-memory row padding: keeps every WMMA pointer 32-byte aligned and every leading
// dimension a multiple of 16 bytes, while shifting consecutive rows across banks.
constexpr int kHalfPad = 8;
constexpr int kFloatPad = 4;
constexpr int kScoreLd = kTile + kFloatPad;  // float32 [kTile][kTile] score tiles
constexpr int kProbLd = kTile + kHalfPad;  // 16-bit [kTile][kTile] probability tiles
constexpr unsigned kFullMask = 0xffffffffu;

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr float kInf = __builtin_huge_valf();
// Cody-Waite splits (hi + lo) for accurate argument reduction under --use_fast_math.
constexpr float kLn2Hi = 0.6931471824645996f;  // float(ln 2)
constexpr float kLn2Lo = -1.9046542121259336e-09f;  // ln 2 - kLn2Hi
constexpr float kTwoPiHi = 6.2831854820251465f;  // float(2 pi)
constexpr float kTwoPiLo = -1.7484555314695172e-07f;  // 2 pi - kTwoPiHi
constexpr float kInvTwoPi = 0.15915493667125702f;

static_assert(kTile == 64 && kThreads == 128, "the lane-to-row mappings below assume 4 warps x 16 rows");

// Shared-memory regions are carved at 128-byte boundaries (WMMA needs 32).
constexpr int aligned_bytes(int bytes) { return (bytes + 127) / 128 * 128; }

template <int D>
struct HeadDim {
  static_assert(D == 64 || D == 128, "head dims 64 and 128 are instantiated");
  static constexpr int kPairs = D / 2;  // P
  static constexpr int kLd = D + kHalfPad;  // 16-bit [kTile][D] tiles
  static constexpr int kAccLd = D + kFloatPad;  // float32 [kTile][D] tiles
  static constexpr int kTileBytes = aligned_bytes(kTile * kLd * 2);
  static constexpr int kAccTileBytes = aligned_bytes(kTile * kAccLd * 4);
};
constexpr int kScoreBytes = aligned_bytes(kTile * kScoreLd * 4);
constexpr int kProbBytes = aligned_bytes(kTile * kProbLd * 2);
constexpr int kVectorBytes = aligned_bytes(kTile * 4);  // one float per tile row

// ---- 16-bit element types ------------------------------------------------------------------

template <typename T>
struct Element;

template <>
struct Element<__half> {
  using Pair = __half2;
  static __device__ __forceinline__ __half from_float(float x) { return __float2half_rn(x); }
  static __device__ __forceinline__ float2 to_float2(Pair p) { return __half22float2(p); }
  static __device__ __forceinline__ Pair pair(float a, float b) { return __floats2half2_rn(a, b); }
};

template <>
struct Element<__nv_bfloat16> {
  using Pair = __nv_bfloat162;
  static __device__ __forceinline__ __nv_bfloat16 from_float(float x) { return __float2bfloat16_rn(x); }
  static __device__ __forceinline__ float2 to_float2(Pair p) { return __bfloat1622float2(p); }
  static __device__ __forceinline__ Pair pair(float a, float b) { return __floats2bfloat162_rn(a, b); }
};

// ---- small helpers -------------------------------------------------------------------------

__device__ __forceinline__ int clamp_length(int32_t length, int limit) {
  return length < 0 ? 0 : (length > limit ? limit : static_cast<int>(length));
}

// Butterfly sum: every lane ends with the same value, in the same order on every run.
__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) x += __shfl_xor_sync(kFullMask, x, offset);
  return x;
}

// Combine the two lanes that share a score row (lanes 2r and 2r + 1). a + b == b + a in IEEE
// arithmetic, so both lanes hold bitwise the same result.
__device__ __forceinline__ float pair_sum(float x) { return x + __shfl_xor_sync(kFullMask, x, 1); }
__device__ __forceinline__ float pair_max(float x) { return fmaxf(x, __shfl_xor_sync(kFullMask, x, 1)); }

// ---- rotation tables -------------------------------------------------------------------------

// exp(x) to ~2 ulp even under --use_fast_math (which turns expf into a 2^(x log2 e) whose
// error grows with |x|): x = n ln2 + r with |r| <= ln2 / 2, then exp(r) * 2^n.
__device__ __forceinline__ float exp_accurate(float x) {
  const float n = rintf(x * kLog2e);
  float r = fmaf(-n, kLn2Hi, x);
  r = fmaf(-n, kLn2Lo, r);
  return ldexpf(exp2f(r * kLog2e), static_cast<int>(n));
}

// sin and cos of angles of any size: --use_fast_math's __sinf/__cosf are only accurate on
// [-pi, pi], and rotary angles reach pos (thousands of radians), so reduce modulo 2 pi first.
__device__ __forceinline__ void sincos_accurate(float phi, float* s, float* c) {
  const float turns = rintf(phi * kInvTwoPi);
  float r = fmaf(-turns, kTwoPiHi, phi);
  r = fmaf(-turns, kTwoPiLo, r);
  __sincosf(r, s, c);
}

struct PairRotation {
  float cos;
  float sin;
  float phi;
};

// phi_{t,m} = pos_t * exp(-(2m / D) * log_theta_t), rounded like reference.rotation_angles:
// 2m / D is exact (D is a power of two), so the exponent is one float product.
template <int D>
__device__ __forceinline__ PairRotation pair_rotation(float pos, float log_theta, int m) {
  const float exponent = -(static_cast<float>(m) * (2.0f / D)) * log_theta;
  PairRotation rot;
  rot.phi = pos * exp_accurate(exponent);
  sincos_accurate(rot.phi, &rot.sin, &rot.cos);
  return rot;
}

// ---- tile loads --------------------------------------------------------------------------------

// dst[row][:] = src row t0 + row, zero at or past `length`, columns kept in the source's layout
// (natural for v / dout, split for the rotated scratch); copied in 16-byte vectors (the wrapper
// guarantees 16-byte aligned tensors, and the scratch comes from torch's allocator).
template <typename T, int D>
__device__ void load_plain_tile(T* dst, const T* src, int t0, int length) {
  constexpr int kVector = 16 / sizeof(T);
  constexpr int kChunks = D / kVector;
  constexpr int ld = HeadDim<D>::kLd;
  for (int idx = threadIdx.x; idx < kTile * kChunks; idx += kThreads) {
    const int row = idx / kChunks;
    const int chunk = idx % kChunks;
    const int t = t0 + row;
    uint4 value = make_uint4(0u, 0u, 0u, 0u);
    if (t < length) value = reinterpret_cast<const uint4*>(src + int64_t(t) * D)[chunk];
    *reinterpret_cast<uint4*>(dst + row * ld + chunk * kVector) = value;
  }
}

// dst[row] = src[t0 + row], or `fill` at or past `length`.
__device__ __forceinline__ void load_vector(float* dst, const float* src, int t0, int length, float fill) {
  for (int row = threadIdx.x; row < kTile; row += kThreads) {
    const int t = t0 + row;
    dst[row] = t < length ? src[t] : fill;
  }
}

// ---- masks and tile ranges -------------------------------------------------------------------

// The contract's allowed_ij: key inside its length, query inside its length, and with
// `causal` the bottom-right aligned diagonal of this batch entry's lengths.
__device__ __forceinline__ bool allowed(int i, int j, int lq, int lk, bool causal) {
  return i < lq && j < lk && (!causal || j <= i + (lk - lq));
}

// Keys [0, end) can be allowed for some query of rows [q0, q0 + rows); 0 when none is.
__device__ __forceinline__ int key_end_for_query_rows(int q0, int rows, int lq, int lk, bool causal) {
  const int last = min(q0 + rows, lq) - 1;
  if (last < q0) return 0;
  return causal ? max(0, min(lk, last + (lk - lq) + 1)) : lk;
}

__device__ __forceinline__ int key_end_for_query_tile(int q0, int lq, int lk, bool causal) {
  return key_end_for_query_rows(q0, kTile, lq, lk, causal);
}

// First query tile (a multiple of `rows`) that can attend to a key of the tile starting at k0;
// queries past lq attend to nothing, so the caller loops [begin, lq). Returns lq when no key
// of the tile is valid.
__device__ __forceinline__ int query_rows_begin_for_keys(int k0, int rows, int lq, int lk, bool causal) {
  if (k0 >= lk) return lq;
  const int first = causal ? max(0, k0 - (lk - lq)) : 0;
  return first / rows * rows;
}

__device__ __forceinline__ int query_tile_begin_for_key_tile(int k0, int lq, int lk, bool causal) {
  return query_rows_begin_for_keys(k0, kTile, lq, lk, causal);
}

// Per-row log2-domain lse for the backward: +inf on rows with no allowed key (or past the
// length), so exp2(s - lse) = 0 there instead of NaN from -inf - -inf.
__device__ __forceinline__ float backward_lse2(const float* lse, int t, int length) {
  if (t >= length) return kInf;
  const float value = lse[t];
  return value == -kInf ? kInf : value * kLog2e;
}

// ---- pitch bias ----------------------------------------------------------------------------

struct BiasArgs {
  int kind;  // kBiasNone / kBiasExp / kBiasL1
  float alpha;  // this head's weight
  float beta;
  // alpha and beta times log2(e), for the bias in the log2 units of the logits: the exp
  // bias's e^{-beta |dp|} is then a bare exp2 (one MUFU op) and the bias needs no final
  // scaling by log2(e).
  float alpha2;
  float beta2;
};

__device__ __forceinline__ BiasArgs bias_args(int kind, float alpha, float beta) {
  return BiasArgs{kind, alpha, beta, alpha * kLog2e, beta * kLog2e};
}

// e^{-beta |dp|} v v', the exp bias per unit of alpha (and its gradient's weight).
__device__ __forceinline__ float exp_bias_weight(const BiasArgs& b, float dist, float both) {
  return exp2f(-b.beta2 * dist) * both;
}

// The log2-domain logit of one allowed pair: score * scale * log2(e) + bias * log2(e), the
// bias being alpha e^{-beta |dp|} v v' (exp) or -alpha beta |dp| v v' (l1). The forward and
// both backward kernels call this one function, so the bias and the scaling agree bit for bit;
// the score itself need not (the mma dK/dV kernel sums k~ . q~ in another order than the
// forward's q~ . k~), so the recomputed P = exp2(logit - lse2) may differ from the forward's by
// a few ulps, which the golden tolerance covers.
__device__ __forceinline__ float logit2(float score, float qk_scale, const BiasArgs& b, float pitch_q, float voiced_q,
                                        float pitch_k, float voiced_k) {
  float x = score * qk_scale;
  if (b.kind == kBiasNone) return x;
  const float dist = fabsf(pitch_q - pitch_k);
  const float both = voiced_q * voiced_k;
  if (b.kind == kBiasExp) return x + b.alpha2 * exp_bias_weight(b, dist, both);
  return x - b.alpha2 * b.beta * dist * both;
}

// The bias gradient per unit of ds = dL/ds_ij (as chunked.bias_block_grads): summed over the
// other side, ds * alpha_factor, ds * beta_factor and ds * pair_factor are the shares of
// dalpha_h, dbeta and dpitch_i; -ds * pair_factor is the share of dpitch_j. d|x|/dx at 0 is 0.
struct BiasGrad {
  float alpha_factor;
  float beta_factor;
  float pair_factor;
};

__device__ __forceinline__ BiasGrad pitch_bias_grad(const BiasArgs& b, float pitch_q, float voiced_q, float pitch_k,
                                                    float voiced_k) {
  const float delta = pitch_q - pitch_k;
  const float dist = fabsf(delta);
  const float sign = delta > 0.0f ? 1.0f : (delta < 0.0f ? -1.0f : 0.0f);
  const float both = voiced_q * voiced_k;
  float weight;
  BiasGrad g;
  if (b.kind == kBiasExp) {
    weight = exp_bias_weight(b, dist, both);
    g.alpha_factor = weight;
  } else {
    weight = both;
    g.alpha_factor = -b.beta * (weight * dist);
  }
  g.beta_factor = -b.alpha * (weight * dist);
  g.pair_factor = -b.beta * b.alpha * weight * sign;
  return g;
}

// ---- warp-level tensor-core products -------------------------------------------------------
// `a` points at the warp's first row; every operand lives in shared memory.

// c[16][N] = a[16][K] . b[N][K]^T, written to float32 `c` (leading dimension ldc).
template <typename T, int K, int N>
__device__ __forceinline__ void warp_mma_abt(float* c, int ldc, const T* a, int lda, const T* b, int ldb) {
  using namespace nvcuda;
#pragma unroll
  for (int n = 0; n < N; n += kMma) {
    wmma::fragment<wmma::accumulator, kMma, kMma, kMma, float> acc;
    wmma::fill_fragment(acc, 0.0f);
#pragma unroll
    for (int k = 0; k < K; k += kMma) {
      wmma::fragment<wmma::matrix_a, kMma, kMma, kMma, T, wmma::row_major> fa;
      // b^T as a column-major K x N matrix: element (k, n) sits at b[n * ldb + k].
      wmma::fragment<wmma::matrix_b, kMma, kMma, kMma, T, wmma::col_major> fb;
      wmma::load_matrix_sync(fa, a + k, lda);
      wmma::load_matrix_sync(fb, b + n * ldb + k, ldb);
      wmma::mma_sync(acc, fa, fb, acc);
    }
    wmma::store_matrix_sync(c + n, acc, ldc, wmma::mem_row_major);
  }
}

template <int N>
using AccumulatorRow = nvcuda::wmma::fragment<nvcuda::wmma::accumulator, kMma, kMma, kMma, float>[N / kMma];

template <int N>
__device__ __forceinline__ void zero_accumulators(AccumulatorRow<N>& acc) {
#pragma unroll
  for (int n = 0; n < N / kMma; ++n) nvcuda::wmma::fill_fragment(acc[n], 0.0f);
}

// acc[16][N] += a[16][K] . b[K][N] with the accumulator held in registers.
template <typename T, int K, int N>
__device__ __forceinline__ void warp_mma_ab(AccumulatorRow<N>& acc, const T* a, int lda, const T* b, int ldb) {
  using namespace nvcuda;
#pragma unroll
  for (int n = 0; n < N / kMma; ++n) {
#pragma unroll
    for (int k = 0; k < K; k += kMma) {
      wmma::fragment<wmma::matrix_a, kMma, kMma, kMma, T, wmma::row_major> fa;
      wmma::fragment<wmma::matrix_b, kMma, kMma, kMma, T, wmma::row_major> fb;
      wmma::load_matrix_sync(fa, a + k, lda);
      wmma::load_matrix_sync(fb, b + k * ldb + n * kMma, ldb);
      wmma::mma_sync(acc[n], fa, fb, acc[n]);
    }
  }
}

template <int N>
__device__ __forceinline__ void store_accumulators(float* c, int ldc, AccumulatorRow<N>& acc) {
#pragma unroll
  for (int n = 0; n < N / kMma; ++n) nvcuda::wmma::store_matrix_sync(c + n * kMma, acc[n], ldc, nvcuda::wmma::mem_row_major);
}

// ---- backward through the rotation ----------------------------------------------------------

struct FeatureGrad {
  float log_theta;
  float radius;
};

// Pulls g = dL/d(rotated x) of one token (float32, split layout, times g_scale) back to x
// (written to dx in the interleaved layout) and to the token's log-theta and radius, as
// chunked.unrotate: dL/dr = <g, unit rotation>, dL/dphi_m = r (g_odd ue - g_even uo) and
// dphi_m / dlog_theta = -(2m / D) phi_m. Called by a whole warp (lanes over pairs); every
// lane returns the warp-summed feature gradients.
template <typename T, int D>
__device__ FeatureGrad warp_unrotate_row(const float* g, float g_scale, const T* x, bool padded, float pos,
                                         float log_theta, float radius, T* dx) {
  using E = Element<T>;
  constexpr int P = HeadDim<D>::kPairs;
  const int lane = threadIdx.x % kWarpSize;
  if (padded) {
    // A padded token passes no gradient, and its row (torch.empty padding) may hold NaN: never
    // read it. The whole warp takes this branch (one row per warp), so no shuffle is left waiting.
    for (int m = lane; m < P; m += kWarpSize) reinterpret_cast<typename E::Pair*>(dx)[m] = E::pair(0.0f, 0.0f);
    return FeatureGrad{0.0f, 0.0f};
  }
  float dradius = 0.0f;
  float dlog_theta = 0.0f;
  for (int m = lane; m < P; m += kWarpSize) {
    const float ge = g_scale * g[m];
    const float go = g_scale * g[P + m];
    const float2 xm = E::to_float2(reinterpret_cast<const typename E::Pair*>(x)[m]);
    const PairRotation rot = pair_rotation<D>(pos, log_theta, m);
    const float unit_even = xm.x * rot.cos - xm.y * rot.sin;
    const float unit_odd = xm.x * rot.sin + xm.y * rot.cos;
    dradius += ge * unit_even + go * unit_odd;
    const float dphi = radius * (go * unit_even - ge * unit_odd);
    dlog_theta += dphi * rot.phi * (-(static_cast<float>(m) * (2.0f / D)));
    reinterpret_cast<typename E::Pair*>(dx)[m] =
        E::pair(radius * (ge * rot.cos + go * rot.sin), radius * (go * rot.cos - ge * rot.sin));
  }
  return FeatureGrad{warp_sum(dlog_theta), warp_sum(dradius)};
}

// ---- launch helpers ----------------------------------------------------------------------------

// Calls f(T{}, std::integral_constant<int, D>{}) for the element type and head dim the wrapper
// admits (fp16 / bf16, D = 64 / 128): the one place that turns runtime values into the template
// arguments of the kernels' launchers.
template <typename F>
void dispatch_type_and_dim(ElementType type, int head_dim, F&& f) {
  using D64 = std::integral_constant<int, 64>;
  using D128 = std::integral_constant<int, 128>;
  if (type == ElementType::kFloat16) {
    if (head_dim == 64) return f(__half{}, D64{});
    return f(__half{}, D128{});
  }
  if (head_dim == 64) return f(__nv_bfloat16{}, D64{});
  return f(__nv_bfloat16{}, D128{});
}

// Rotation prologue (vrope_rotate.cu): writes Params::q_rot and k_rot from q and k. One compiled
// kernel serves the forward and the backward, so both see bitwise the same q~ and k~.
void launch_rotation(const Params& p, ElementType type, int head_dim, cudaStream_t stream);

// Offset (in elements) of token 0 of (batch b, head h) in a [B, heads, T, width] tensor.
__device__ __forceinline__ int64_t head_offset(int b, int h, int heads, int length, int width) {
  return (int64_t(b) * heads + h) * length * width;
}

}  // namespace vrope
}  // namespace echo
