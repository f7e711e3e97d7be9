// Deterministic backward of pitch-aware rotary attention (no float atomics anywhere).
//
// Three kernels, as chunked.backward states the maths, after the rotation prologue
// (vrope_rotate.cu) has written q~ and k~ to scratch once; every q~ / k~ tile below is a
// plain copy of that scratch, and only the epilogues' unrotation computes angles again.
// 1. delta_kernel:   delta_i = rowsum(dO_i * O_i), one warp per row.
// 2. dkdv_kernel:    one CTA per (key tile, kv head, batch); loops over the GQA group's query
//                    heads and then the query tiles, in a fixed order, recomputing
//                    P^T = exp2(S^T - lse) and dS^T = P^T * (dP^T - delta); accumulates
//                    dV = P^T dO and dk~ = scale dS^T q~ in registers, then unrotates dk~
//                    into dk and the key-side log-theta / radius partials; the key-side pitch
//                    partial comes from dS. Partials are per (b, kv head, key).
// 3. dq_kernel:      one CTA per (query tile, head, batch); loops over the key tiles and
//                    accumulates dq~ = scale dS k~; unrotates it into dq and the query-side
//                    partials; the pitch / alpha / beta partials come from dS. Per (b, head, row).
// The Python wrapper sums the partials over heads (and rows for alpha / beta) in a fixed order.
#include <c10/cuda/CUDAException.h>

#include "cuda/vrope_common.cuh"

namespace echo {
namespace vrope {
namespace {

// ---- 1. delta = rowsum(dO * O) -----------------------------------------------------------------

template <typename T, int D>
__global__ void __launch_bounds__(kThreads) delta_kernel(const Params p) {
  using E = Element<T>;
  const int64_t rows = int64_t(p.batch) * p.heads * p.tq;
  const int64_t row = int64_t(blockIdx.x) * kWarps + threadIdx.x / kWarpSize;
  if (row >= rows) return;  // whole warps leave together
  const int lane = threadIdx.x % kWarpSize;
  const auto* dout = reinterpret_cast<const typename E::Pair*>(static_cast<const T*>(p.dout) + row * D);
  const auto* out = reinterpret_cast<const typename E::Pair*>(static_cast<const T*>(p.out) + row * D);
  // Rows past the batch's query length get delta 0 without reading dout, which may hold
  // anything there (even NaN) and would otherwise reach dS through 0 * (dP - delta).
  const int b = static_cast<int>(row / (int64_t(p.heads) * p.tq));
  const bool padded = static_cast<int>(row % p.tq) >= clamp_length(p.q_lengths[b], p.tq);
  float sum = 0.0f;
  for (int m = lane; m < (padded ? 0 : D / 2); m += kWarpSize) {
    const float2 a = E::to_float2(dout[m]);
    const float2 o = E::to_float2(out[m]);
    sum += a.x * o.x + a.y * o.y;
  }
  sum = warp_sum(sum);
  if (lane == 0) p.delta[row] = sum;
}

// ---- 2. dK / dV ------------------------------------------------------------------------------

template <int D>
struct DkdvSmem {
  using H = HeadDim<D>;
  static constexpr int kK = 0;  // rotated k, split layout [kTile][D]
  static constexpr int kV = kK + H::kTileBytes;  // v [kTile][D]
  static constexpr int kQ = kV + H::kTileBytes;  // rotated q, split layout [kTile][D]
  static constexpr int kDo = kQ + H::kTileBytes;  // dout [kTile][D]
  static constexpr int kS = kDo + H::kTileBytes;  // float32 S^T [keys][queries]
  static constexpr int kDp = kS + kScoreBytes;  // float32 dP^T
  static constexpr int kP = kDp + kScoreBytes;  // P^T in T
  static constexpr int kDs = kP + kProbBytes;  // dS^T in T
  static constexpr int kLse = kDs + kProbBytes;  // per query of the tile: lse (log2 units)
  static constexpr int kDelta = kLse + kVectorBytes;
  static constexpr int kPitchQ = kDelta + kVectorBytes;
  static constexpr int kVoicedQ = kPitchQ + kVectorBytes;
  static constexpr int kBytes = kVoicedQ + kVectorBytes;
  // Epilogue reuse once the loop is over: float32 dk~ over q + dout, float32 dV over S^T + dP^T.
  static constexpr int kDkAcc = kQ;
  static constexpr int kDvAcc = kS;
  static_assert(H::kAccTileBytes <= 2 * H::kTileBytes, "dk~ must fit over the q and dout tiles");
  static_assert(H::kAccTileBytes <= 2 * kScoreBytes, "dV must fit over the two score tiles");
};

template <typename T, int D>
__global__ void __launch_bounds__(kThreads) dkdv_kernel(const Params p) {
  using E = Element<T>;
  using H = HeadDim<D>;
  using L = DkdvSmem<D>;
  extern __shared__ __align__(128) unsigned char smem[];
  T* k_tile = reinterpret_cast<T*>(smem + L::kK);
  T* v_tile = reinterpret_cast<T*>(smem + L::kV);
  T* q_tile = reinterpret_cast<T*>(smem + L::kQ);
  T* do_tile = reinterpret_cast<T*>(smem + L::kDo);
  float* s_t = reinterpret_cast<float*>(smem + L::kS);
  float* dp_t = reinterpret_cast<float*>(smem + L::kDp);
  T* p_t = reinterpret_cast<T*>(smem + L::kP);
  T* ds_t = reinterpret_cast<T*>(smem + L::kDs);
  float* lse2_q = reinterpret_cast<float*>(smem + L::kLse);
  float* delta_q = reinterpret_cast<float*>(smem + L::kDelta);
  float* pitch_q = reinterpret_cast<float*>(smem + L::kPitchQ);
  float* voiced_q = reinterpret_cast<float*>(smem + L::kVoicedQ);

  const int k0 = blockIdx.x * kTile;
  const int kv_head = blockIdx.y;
  const int b = blockIdx.z;
  const int group = p.heads / p.kv_heads;
  const int lq = clamp_length(p.q_lengths[b], p.tq);
  const int lk = clamp_length(p.k_lengths[b], p.tk);

  const int64_t k_head = head_offset(b, kv_head, p.kv_heads, p.tk, D);
  const T* k = static_cast<const T*>(p.k) + k_head;  // read again by the unrotation only
  const T* k_rot = static_cast<const T*>(p.k_rot) + k_head;
  const T* v = static_cast<const T*>(p.v) + k_head;
  const int64_t q_feat = int64_t(b) * p.tq;
  const int64_t k_feat = int64_t(b) * p.tk;

  const int warp = threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  // Elementwise mapping: lanes 2r and 2r + 1 of warp w share key row 16 w + r (queries in columns).
  const int my_row = warp * kWarpRows + lane / 2;
  const int my_col0 = (lane % 2) * kHalfCols;
  const int j = k0 + my_row;

  load_plain_tile<T, D>(k_tile, k_rot, k0, p.tk);
  load_plain_tile<T, D>(v_tile, v, k0, lk);  // rows past lk may hold anything, even NaN
  const float pitch_j = j < p.tk ? p.fk.pitch[k_feat + j] : 0.0f;
  const float voiced_j = j < p.tk ? p.fk.voiced[k_feat + j] : 0.0f;
  const float qk_scale = p.scale * kLog2e;
  const float beta = *p.beta;

  AccumulatorRow<D> dv_acc;
  AccumulatorRow<D> dk_acc;  // sum over queries of dS^T q~ (times scale in the epilogue)
  zero_accumulators<D>(dv_acc);
  zero_accumulators<D>(dk_acc);
  float dpitch_j = 0.0f;  // this lane's share of the key's pitch gradient

  const int q_begin = query_tile_begin_for_key_tile(k0, lq, lk, p.causal);
  for (int g = 0; g < group; ++g) {
    const int head = kv_head * group + g;
    const int64_t q_head = head_offset(b, head, p.heads, p.tq, D);
    const T* q_rot = static_cast<const T*>(p.q_rot) + q_head;
    const T* dout = static_cast<const T*>(p.dout) + q_head;
    const int64_t row_base = (int64_t(b) * p.heads + head) * p.tq;
    const BiasArgs bias = bias_args(p.bias, p.alpha[head], beta);
    for (int q0 = q_begin; q0 < lq; q0 += kTile) {
      __syncthreads();  // every warp is done with the previous q / dout tiles
      load_plain_tile<T, D>(q_tile, q_rot, q0, p.tq);
      load_plain_tile<T, D>(do_tile, dout, q0, lq);  // rows past lq may hold anything, even NaN
      for (int c = threadIdx.x; c < kTile; c += kThreads) lse2_q[c] = backward_lse2(p.lse + row_base, q0 + c, p.tq);
      load_vector(delta_q, p.delta + row_base, q0, p.tq, 0.0f);
      load_vector(pitch_q, p.fq.pitch + q_feat, q0, p.tq, 0.0f);
      load_vector(voiced_q, p.fq.voiced + q_feat, q0, p.tq, 0.0f);
      __syncthreads();

      // S^T = k~ q~^T and dP^T = V dO^T for this warp's 16 keys.
      warp_mma_abt<T, D, kTile>(s_t + warp * kWarpRows * kScoreLd, kScoreLd, k_tile + warp * kWarpRows * H::kLd,
                                H::kLd, q_tile, H::kLd);
      warp_mma_abt<T, D, kTile>(dp_t + warp * kWarpRows * kScoreLd, kScoreLd, v_tile + warp * kWarpRows * H::kLd,
                                H::kLd, do_tile, H::kLd);
      __syncwarp();

#pragma unroll 4
      for (int c = 0; c < kHalfCols; ++c) {
        const int col = my_col0 + c;
        const int i = q0 + col;
        float prob = 0.0f;
        float ds = 0.0f;
        if (allowed(i, j, lq, lk, p.causal)) {
          const float x = logit2(s_t[my_row * kScoreLd + col], qk_scale, bias, pitch_q[col], voiced_q[col], pitch_j,
                                 voiced_j);
          prob = exp2f(x - lse2_q[col]);
          ds = prob * (dp_t[my_row * kScoreLd + col] - delta_q[col]);
          if (bias.kind != kBiasNone) {
            dpitch_j -= ds * pitch_bias_grad(bias, pitch_q[col], voiced_q[col], pitch_j, voiced_j).pair_factor;
          }
        }
        p_t[my_row * kProbLd + col] = E::from_float(prob);
        ds_t[my_row * kProbLd + col] = E::from_float(ds);
      }
      __syncwarp();

      // dV += P^T dO and dk~ += dS^T q~ (this warp's 16 keys, all D columns).
      warp_mma_ab<T, kTile, D>(dv_acc, p_t + warp * kWarpRows * kProbLd, kProbLd, do_tile, H::kLd);
      warp_mma_ab<T, kTile, D>(dk_acc, ds_t + warp * kWarpRows * kProbLd, kProbLd, q_tile, H::kLd);
    }
  }

  // Epilogue. The accumulators move to shared memory (over tiles no warp reads any more).
  __syncthreads();
  float* dk_rows = reinterpret_cast<float*>(smem + L::kDkAcc);
  float* dv_rows = reinterpret_cast<float*>(smem + L::kDvAcc);
  store_accumulators<D>(dk_rows + warp * kWarpRows * H::kAccLd, H::kAccLd, dk_acc);
  store_accumulators<D>(dv_rows + warp * kWarpRows * H::kAccLd, H::kAccLd, dv_acc);
  __syncwarp();

  const int64_t key_base = (int64_t(b) * p.kv_heads + kv_head) * p.tk;
  dpitch_j = pair_sum(dpitch_j);
  if (lane % 2 == 0 && j < p.tk) p.dpitch_k[key_base + j] = dpitch_j;

  T* dk = static_cast<T*>(p.dk) + head_offset(b, kv_head, p.kv_heads, p.tk, D);
  T* dv = static_cast<T*>(p.dv) + head_offset(b, kv_head, p.kv_heads, p.tk, D);
  for (int r = 0; r < kWarpRows; ++r) {
    const int row = warp * kWarpRows + r;
    const int t = k0 + row;
    if (t >= p.tk) break;
    const FeatureGrad fg = warp_unrotate_row<T, D>(dk_rows + row * H::kAccLd, p.scale, k + int64_t(t) * D, t >= lk,
                                                   p.fk.pos[k_feat + t], p.fk.log_theta[k_feat + t],
                                                   p.fk.radius[k_feat + t], dk + int64_t(t) * D);
    if (lane == 0) {
      p.dlog_theta_k[key_base + t] = fg.log_theta;
      p.dradius_k[key_base + t] = fg.radius;
    }
    const float* dv_row = dv_rows + row * H::kAccLd;
    auto* dv_out = reinterpret_cast<typename E::Pair*>(dv + int64_t(t) * D);
    for (int m = lane; m < D / 2; m += kWarpSize) dv_out[m] = E::pair(dv_row[2 * m], dv_row[2 * m + 1]);
  }
}

// ---- 3. dQ -----------------------------------------------------------------------------------

template <int D>
struct DqSmem {
  using H = HeadDim<D>;
  static constexpr int kQ = 0;  // rotated q, split layout [kTile][D]
  static constexpr int kDo = kQ + H::kTileBytes;  // dout [kTile][D]
  static constexpr int kK = kDo + H::kTileBytes;  // rotated k, split layout [kTile][D]
  static constexpr int kV = kK + H::kTileBytes;  // v [kTile][D]
  static constexpr int kS = kV + H::kTileBytes;  // float32 S [queries][keys]
  static constexpr int kDp = kS + kScoreBytes;  // float32 dP
  static constexpr int kDs = kDp + kScoreBytes;  // dS in T
  static constexpr int kPitchK = kDs + kProbBytes;
  static constexpr int kVoicedK = kPitchK + kVectorBytes;
  static constexpr int kBytes = kVoicedK + kVectorBytes;
  // Epilogue reuse: float32 dq~ over the k and v tiles.
  static constexpr int kDqAcc = kK;
  static_assert(H::kAccTileBytes <= 2 * H::kTileBytes, "dq~ must fit over the k and v tiles");
};

template <typename T, int D>
__global__ void __launch_bounds__(kThreads) dq_kernel(const Params p) {
  using E = Element<T>;
  using H = HeadDim<D>;
  using L = DqSmem<D>;
  extern __shared__ __align__(128) unsigned char smem[];
  T* q_tile = reinterpret_cast<T*>(smem + L::kQ);
  T* do_tile = reinterpret_cast<T*>(smem + L::kDo);
  T* k_tile = reinterpret_cast<T*>(smem + L::kK);
  T* v_tile = reinterpret_cast<T*>(smem + L::kV);
  float* scores = reinterpret_cast<float*>(smem + L::kS);
  float* dp = reinterpret_cast<float*>(smem + L::kDp);
  T* ds_tile = reinterpret_cast<T*>(smem + L::kDs);
  float* pitch_k = reinterpret_cast<float*>(smem + L::kPitchK);
  float* voiced_k = reinterpret_cast<float*>(smem + L::kVoicedK);

  const int q0 = blockIdx.x * kTile;
  const int head = blockIdx.y;
  const int b = blockIdx.z;
  const int kv_head = head / (p.heads / p.kv_heads);
  const int lq = clamp_length(p.q_lengths[b], p.tq);
  const int lk = clamp_length(p.k_lengths[b], p.tk);

  const int64_t q_head = head_offset(b, head, p.heads, p.tq, D);
  const T* q = static_cast<const T*>(p.q) + q_head;  // read again by the unrotation only
  const T* q_rot = static_cast<const T*>(p.q_rot) + q_head;
  const T* dout = static_cast<const T*>(p.dout) + q_head;
  const T* k_rot = static_cast<const T*>(p.k_rot) + head_offset(b, kv_head, p.kv_heads, p.tk, D);
  const T* v = static_cast<const T*>(p.v) + head_offset(b, kv_head, p.kv_heads, p.tk, D);
  const int64_t q_feat = int64_t(b) * p.tq;
  const int64_t k_feat = int64_t(b) * p.tk;
  const int64_t row_base = (int64_t(b) * p.heads + head) * p.tq;

  const int warp = threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  // Elementwise mapping: lanes 2r and 2r + 1 of warp w share query row 16 w + r (keys in columns).
  const int my_row = warp * kWarpRows + lane / 2;
  const int my_col0 = (lane % 2) * kHalfCols;
  const int i = q0 + my_row;

  load_plain_tile<T, D>(q_tile, q_rot, q0, p.tq);
  load_plain_tile<T, D>(do_tile, dout, q0, lq);  // rows past lq may hold anything, even NaN
  const float lse2_i = backward_lse2(p.lse + row_base, i, p.tq);
  const float delta_i = i < p.tq ? p.delta[row_base + i] : 0.0f;
  const float pitch_i = i < p.tq ? p.fq.pitch[q_feat + i] : 0.0f;
  const float voiced_i = i < p.tq ? p.fq.voiced[q_feat + i] : 0.0f;
  const BiasArgs bias = bias_args(p.bias, p.alpha[head], *p.beta);
  const float qk_scale = p.scale * kLog2e;

  AccumulatorRow<D> dq_acc;  // sum over keys of dS k~ (times scale in the epilogue)
  zero_accumulators<D>(dq_acc);
  // This lane's shares of the row's pitch, alpha and beta gradients, and of the sums
  // sum_j p f (the same three factors) and sum_j p dp that correct them for delta's rounding.
  float dpitch_i = 0.0f;
  float dalpha_i = 0.0f;
  float dbeta_i = 0.0f;
  float p_pitch = 0.0f;
  float p_alpha = 0.0f;
  float p_beta = 0.0f;
  float p_dp = 0.0f;

  const int key_end = key_end_for_query_tile(q0, lq, lk, p.causal);
  for (int k0 = 0; k0 < key_end; k0 += kTile) {
    __syncthreads();  // every warp is done with the previous k / v tiles
    load_plain_tile<T, D>(k_tile, k_rot, k0, p.tk);
    load_plain_tile<T, D>(v_tile, v, k0, lk);  // rows past lk may hold anything, even NaN
    load_vector(pitch_k, p.fk.pitch + k_feat, k0, p.tk, 0.0f);
    load_vector(voiced_k, p.fk.voiced + k_feat, k0, p.tk, 0.0f);
    __syncthreads();

    // S = q~ k~^T and dP = dO V^T for this warp's 16 queries.
    warp_mma_abt<T, D, kTile>(scores + warp * kWarpRows * kScoreLd, kScoreLd, q_tile + warp * kWarpRows * H::kLd,
                              H::kLd, k_tile, H::kLd);
    warp_mma_abt<T, D, kTile>(dp + warp * kWarpRows * kScoreLd, kScoreLd, do_tile + warp * kWarpRows * H::kLd,
                              H::kLd, v_tile, H::kLd);
    __syncwarp();

#pragma unroll 4
    for (int c = 0; c < kHalfCols; ++c) {
      const int col = my_col0 + c;
      const int j = k0 + col;
      float ds = 0.0f;
      if (allowed(i, j, lq, lk, p.causal)) {
        const float x = logit2(scores[my_row * kScoreLd + col], qk_scale, bias, pitch_i, voiced_i, pitch_k[col],
                               voiced_k[col]);
        const float prob = exp2f(x - lse2_i);
        const float dp_ij = dp[my_row * kScoreLd + col];
        ds = prob * (dp_ij - delta_i);
        if (bias.kind != kBiasNone) {
          const BiasGrad g = pitch_bias_grad(bias, pitch_i, voiced_i, pitch_k[col], voiced_k[col]);
          dalpha_i += ds * g.alpha_factor;
          dbeta_i += ds * g.beta_factor;
          dpitch_i += ds * g.pair_factor;
          p_alpha += prob * g.alpha_factor;
          p_beta += prob * g.beta_factor;
          p_pitch += prob * g.pair_factor;
          p_dp += prob * dp_ij;
        }
      }
      ds_tile[my_row * kProbLd + col] = E::from_float(ds);
    }
    __syncwarp();

    // dq~ += dS k~ (this warp's 16 queries, all D columns).
    warp_mma_ab<T, kTile, D>(dq_acc, ds_tile + warp * kWarpRows * kProbLd, kProbLd, k_tile, H::kLd);
  }

  // Epilogue. dq~ moves to shared memory over the k / v tiles once no warp reads them.
  __syncthreads();
  float* dq_rows = reinterpret_cast<float*>(smem + L::kDqAcc);
  store_accumulators<D>(dq_rows + warp * kWarpRows * H::kAccLd, H::kAccLd, dq_acc);
  __syncwarp();

  dpitch_i = pair_sum(dpitch_i);
  dalpha_i = pair_sum(dalpha_i);
  dbeta_i = pair_sum(dbeta_i);
  if (bias.kind != kBiasNone) {
    // sum_j ds_ij = 0 in exact arithmetic, so these row sums, which add up over every row
    // of the batch into dalpha and dbeta, amplify any error of delta, and delta comes from
    // the output rounded to fp16/bf16. sum_j p dp is the float32 value autograd uses; ds
    // with it is ds + p (delta - sum_j p dp).
    const float correction = delta_i - pair_sum(p_dp);
    dalpha_i += correction * pair_sum(p_alpha);
    dbeta_i += correction * pair_sum(p_beta);
    dpitch_i += correction * pair_sum(p_pitch);
  }
  if (lane % 2 == 0 && i < p.tq) {
    p.dpitch_q[row_base + i] = dpitch_i;
    p.dalpha_rows[row_base + i] = dalpha_i;
    p.dbeta_rows[row_base + i] = dbeta_i;
  }

  T* dq = static_cast<T*>(p.dq) + head_offset(b, head, p.heads, p.tq, D);
  for (int r = 0; r < kWarpRows; ++r) {
    const int row = warp * kWarpRows + r;
    const int t = q0 + row;
    if (t >= p.tq) break;
    const FeatureGrad fg = warp_unrotate_row<T, D>(dq_rows + row * H::kAccLd, p.scale, q + int64_t(t) * D, t >= lq,
                                                   p.fq.pos[q_feat + t], p.fq.log_theta[q_feat + t],
                                                   p.fq.radius[q_feat + t], dq + int64_t(t) * D);
    if (lane == 0) {
      p.dlog_theta_q[row_base + t] = fg.log_theta;
      p.dradius_q[row_base + t] = fg.radius;
    }
  }
}

template <typename T, int D>
void run_delta(const Params& p, cudaStream_t stream) {
  const int64_t rows = int64_t(p.batch) * p.heads * p.tq;
  const unsigned delta_blocks = static_cast<unsigned>((rows + kWarps - 1) / kWarps);
  delta_kernel<T, D><<<delta_blocks, kThreads, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, int D>
void run_backward(const Params& p, cudaStream_t stream) {
  run_delta<T, D>(p, stream);

  constexpr int dkdv_bytes = DkdvSmem<D>::kBytes;
  auto* dkdv = dkdv_kernel<T, D>;
  C10_CUDA_CHECK(cudaFuncSetAttribute(dkdv, cudaFuncAttributeMaxDynamicSharedMemorySize, dkdv_bytes));
  const dim3 kv_grid((p.tk + kTile - 1) / kTile, p.kv_heads, p.batch);
  dkdv<<<kv_grid, kThreads, dkdv_bytes, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  constexpr int dq_bytes = DqSmem<D>::kBytes;
  auto* dq = dq_kernel<T, D>;
  C10_CUDA_CHECK(cudaFuncSetAttribute(dq, cudaFuncAttributeMaxDynamicSharedMemorySize, dq_bytes));
  const dim3 q_grid((p.tq + kTile - 1) / kTile, p.heads, p.batch);
  dq<<<q_grid, kThreads, dq_bytes, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

int backward_shared_memory_bytes(int head_dim) {
  if (head_dim == 64) return DkdvSmem<64>::kBytes > DqSmem<64>::kBytes ? DkdvSmem<64>::kBytes : DqSmem<64>::kBytes;
  return DkdvSmem<128>::kBytes > DqSmem<128>::kBytes ? DkdvSmem<128>::kBytes : DqSmem<128>::kBytes;
}

void launch_delta(const Params& params, ElementType type, int head_dim, cudaStream_t stream) {
  dispatch_type_and_dim(type, head_dim, [&](auto element, auto dim) {
    run_delta<decltype(element), decltype(dim)::value>(params, stream);
  });
}

void launch_backward(const Params& params, ElementType type, int head_dim, cudaStream_t stream) {
  launch_rotation(params, type, head_dim, stream);
  dispatch_type_and_dim(type, head_dim, [&](auto element, auto dim) {
    run_backward<decltype(element), decltype(dim)::value>(params, stream);
  });
}

}  // namespace vrope
}  // namespace echo
