// Register-resident deterministic backward of pitch-aware rotary attention, on CuTe's sm80
// tensor-core atoms. Same maths, outputs and partials as vrope_bwd.cu (read its header), the
// same delta kernel and rotation prologue, but every score, probability, dS and gradient
// accumulator stays in registers (m16n8k16, float32 accumulation), probabilities and dS feed
// the next product as A operands without leaving registers, tiles arrive by cp.async into
// swizzled shared memory (double-buffered on the streamed side) and reach the tensor cores
// through ldmatrix (transposed where a product wants the tile's transpose).
//
// 1. dkdv_mma_kernel: one CTA per (64-key tile, kv head, batch), warps over keys. Walks the GQA
//    group's query heads and their query tiles in a fixed order: S^T = k~ q~^T and dP^T = V dO^T,
//    P^T = exp2(S^T - lse2), dS^T = P^T (dP^T - delta), then dV += P^T dO and dk~ += dS^T q~.
// 2. dq_mma_kernel: one CTA per (64-query tile, head, batch), warps over queries. Walks the key
//    tiles: S = q~ k~^T, dP = dO V^T, dS = P (dP - delta), dq~ += dS k~, and the row's pitch /
//    alpha / beta partials (with the delta-rounding correction of vrope_bwd.cu).
// Both unrotate their float32 accumulator through shared memory with warp_unrotate_row. No
// atomics: every output and partial has one writer, and every sum has a fixed order.
//
// Until a GPU run has checked it against the golden, it is opt-in:
// ECHO_KERNELS_CUDA_BACKWARD=mma (vrope_api.cpp); the WMMA backward stays the default.
#include <c10/cuda/CUDAException.h>

#include "cuda/vrope_cute.cuh"

namespace echo {
namespace vrope {
namespace {

using namespace cute;
using namespace mma;

// ---- tile shapes and shared memory ----------------------------------------------------------------

template <typename T, int D>
struct MmaDq {
  using K = Kit<T>;
  using Elem = typename K::Elem;
  static constexpr int kRows = 64;  // queries per CTA: 4 warps x 16
  static constexpr int kKeys = 64;  // keys per tile
  static constexpr int kAccLd = D + kFloatPad;
  using LayoutRows = typename K::template SmemTile<kRows, D>;
  using LayoutKeys = typename K::template SmemTile<kKeys, D>;
  using LayoutKeysT = typename K::template SmemTileT<kKeys, D>;  // k~^T [D][kKeys] for dS . k~

  struct Tiles {
    alignas(128) Elem q[cosize_v<LayoutRows>];
    alignas(128) Elem dout[cosize_v<LayoutRows>];
    alignas(128) Elem k[2][cosize_v<LayoutKeys>];  // the next tile's k lands while dS . k~ reads this one
    alignas(128) Elem v[cosize_v<LayoutKeys>];
    alignas(16) float pitch_k[kKeys];
    alignas(16) float voiced_k[kKeys];
  };
  union Shared {
    Tiles tiles;
    float dq[kRows * kAccLd];  // epilogue: dq~ in float32, over the tiles
  };
};

template <typename T, int D>
struct MmaDkdv {
  using K = Kit<T>;
  using Elem = typename K::Elem;
  static constexpr int kKeys = 64;  // keys per CTA: 4 warps x 16
  // Queries per tile: D = 128 holds two [64][128] float32 accumulators (dk~, dV: 128 registers)
  // beside S^T and dP^T, so its query tiles are half as wide.
  static constexpr int kRows = D == 64 ? 64 : 32;
  static constexpr int kAccLd = D + kFloatPad;
  using LayoutKeys = typename K::template SmemTile<kKeys, D>;
  using LayoutRows = typename K::template SmemTile<kRows, D>;
  using LayoutRowsT = typename K::template SmemTileT<kRows, D>;  // q~^T / dO^T [D][kRows]

  // Per-query values of one query tile (the columns of S^T).
  struct QueryVectors {
    float lse2[kRows];
    float delta[kRows];
    float pitch[kRows];
    float voiced[kRows];
  };
  struct Tiles {
    alignas(128) Elem k[cosize_v<LayoutKeys>];
    alignas(128) Elem v[cosize_v<LayoutKeys>];
    alignas(128) Elem q[2][cosize_v<LayoutRows>];  // double-buffered: tile n + 1 lands during tile n
    alignas(128) Elem dout[2][cosize_v<LayoutRows>];
    alignas(16) QueryVectors vectors[2];
  };
  union Shared {
    Tiles tiles;
    float dk[kKeys * kAccLd];  // epilogue: dk~ in float32, over the tiles
  };
};

// ---- elementwise steps --------------------------------------------------------------------------

// Per-row state of a dq thread: the query's values and its shares of the row's partials.
template <int kN>
struct DqRows {
  int index[kN];
  float lse2[kN];
  float delta[kN];
  float pitch[kN];
  float voiced[kN];
  float dpitch[kN];
  float dalpha[kN];
  float dbeta[kN];
  float p_pitch[kN];  // sum_j p f over this thread's columns, for the delta-rounding correction
  float p_alpha[kN];
  float p_beta[kN];
  float p_dp[kN];
};

// dS = P (dP - delta) over one (query rows x key columns) tile, written over the scores, and the
// rows' bias partials; P = exp2(logit2 - lse2) with bit for bit the forward's logits.
template <int kKind, bool kMask, typename S, typename Dp, typename Coords, int kN>
__device__ __forceinline__ void dq_tile(S& s, const Dp& dp, const Coords& coords, DqRows<kN>& rows, int k0,
                                        const float* pitch_k, const float* voiced_k, float qk_scale,
                                        const BiasArgs& bias, int lq, int lk, bool causal) {
  BiasArgs b = bias;
  b.kind = kKind;
#pragma unroll
  for (int r = 0; r < size<0>(s); ++r) {
#pragma unroll
    for (int c = 0; c < size<1>(s); ++c) {
      const int col = get<1>(coords(r, c));
      float ds = 0.0f;
      if (!kMask || allowed(rows.index[r], k0 + col, lq, lk, causal)) {
        const float x = logit2(s(r, c), qk_scale, b, rows.pitch[r], rows.voiced[r], pitch_k[col], voiced_k[col]);
        const float prob = exp2f(x - rows.lse2[r]);
        const float dp_ij = dp(r, c);
        ds = prob * (dp_ij - rows.delta[r]);
        if constexpr (kKind != kBiasNone) {
          const BiasGrad g = pitch_bias_grad(b, rows.pitch[r], rows.voiced[r], pitch_k[col], voiced_k[col]);
          rows.dalpha[r] += ds * g.alpha_factor;
          rows.dbeta[r] += ds * g.beta_factor;
          rows.dpitch[r] += ds * g.pair_factor;
          rows.p_alpha[r] += prob * g.alpha_factor;
          rows.p_beta[r] += prob * g.beta_factor;
          rows.p_pitch[r] += prob * g.pair_factor;
          rows.p_dp[r] += prob * dp_ij;
        }
      }
      s(r, c) = ds;
    }
  }
}

// Per-row state of a dkdv thread: the key's values and its share of the key's pitch gradient.
template <int kN>
struct KeyRows {
  int index[kN];
  float pitch[kN];
  float voiced[kN];
  float dpitch[kN];
};

// P^T and dS^T over one (key rows x query columns) tile, written over S^T and dP^T, and the
// keys' pitch partials.
template <int kKind, bool kMask, typename S, typename Dp, typename Coords, int kN, typename Vectors>
__device__ __forceinline__ void dkdv_tile(S& s, Dp& dp, const Coords& coords, KeyRows<kN>& keys, int q0,
                                          const Vectors& qv, float qk_scale, const BiasArgs& bias, int lq, int lk,
                                          bool causal) {
  BiasArgs b = bias;
  b.kind = kKind;
#pragma unroll
  for (int r = 0; r < size<0>(s); ++r) {
#pragma unroll
    for (int c = 0; c < size<1>(s); ++c) {
      const int col = get<1>(coords(r, c));
      float prob = 0.0f;
      float ds = 0.0f;
      if (!kMask || allowed(q0 + col, keys.index[r], lq, lk, causal)) {
        const float x = logit2(s(r, c), qk_scale, b, qv.pitch[col], qv.voiced[col], keys.pitch[r], keys.voiced[r]);
        prob = exp2f(x - qv.lse2[col]);
        ds = prob * (dp(r, c) - qv.delta[col]);
        if constexpr (kKind != kBiasNone) {
          keys.dpitch[r] -= ds * pitch_bias_grad(b, qv.pitch[col], qv.voiced[col], keys.pitch[r], keys.voiced[r]).pair_factor;
        }
      }
      s(r, c) = prob;
      dp(r, c) = ds;
    }
  }
}

// Epilogue of both kernels: the float32 split-layout gradient of the rotated tokens (rows x
// columns view) goes to shared memory over the tiles (after a barrier: every warp is done with
// them), then each warp unrotates whole rows into dx and the tokens' log-theta / radius partials.
// x, dx: this (batch, head)'s [T][D] rows; features: this batch entry's [T]; parts: [T] slots. Rows up to
// length (T) are written; x is read only below valid (the batch entry's length: padding may hold NaN).
template <typename T, int D, int kTileRows, typename Acc, typename Coords>
__device__ __forceinline__ void unrotate_gradient_tile(const Acc& acc, const Coords& coords, float* tile, int ld, int t0,
                                                       int length, int valid, float scale, const T* x, const float* pos,
                                                       const float* log_theta, const float* radius, T* dx,
                                                       float* dlog_theta, float* dradius) {
  __syncthreads();
  store_accumulator(acc, coords, tile, ld);
  __syncthreads();
  const int lane = threadIdx.x % kWarpSize;
  for (int row = threadIdx.x / kWarpSize; row < kTileRows; row += kWarps) {
    const int t = t0 + row;
    if (t >= length) break;
    const FeatureGrad fg = warp_unrotate_row<T, D>(tile + row * ld, scale, x + int64_t(t) * D, t >= valid, pos[t],
                                                   log_theta[t], radius[t], dx + int64_t(t) * D);
    if (lane == 0) {
      dlog_theta[t] = fg.log_theta;
      dradius[t] = fg.radius;
    }
  }
}

// ---- 1. dK / dV -----------------------------------------------------------------------------------

template <typename T, int D>
__global__ void __launch_bounds__(kThreads) dkdv_mma_kernel(const Params p) {
  using Cfg = MmaDkdv<T, D>;
  using Elem = typename Cfg::Elem;
  constexpr int kKeys = Cfg::kKeys;
  constexpr int kRows = Cfg::kRows;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  auto& smem = *reinterpret_cast<typename Cfg::Shared*>(smem_raw);
  auto& tiles = smem.tiles;

  const int tid = threadIdx.x;
  const int lane = tid % kWarpSize;
  const int k_block = blockIdx.x;
  const int kv_head = blockIdx.y;
  const int b = blockIdx.z;
  const int k0 = k_block * kKeys;
  const int group = p.heads / p.kv_heads;
  const int lq = clamp_length(p.q_lengths[b], p.tq);
  const int lk = clamp_length(p.k_lengths[b], p.tk);
  const int q_begin = query_rows_begin_for_keys(k0, kRows, lq, lk, p.causal);
  const int q_tiles = q_begin < lq ? (lq - q_begin + kRows - 1) / kRows : 0;
  const int steps = group * q_tiles;  // (query head, query tile) pairs, head-major
  const float qk_scale = p.scale * kLog2e;
  const float beta = *p.beta;
  const int64_t q_feat = int64_t(b) * p.tq;
  const int64_t k_feat = int64_t(b) * p.tk;

  const int64_t k_head = head_offset(b, kv_head, p.kv_heads, p.tk, D);
  Tensor s_k = make_tensor(make_smem_ptr(tiles.k), typename Cfg::LayoutKeys{});
  Tensor s_v = make_tensor(make_smem_ptr(tiles.v), typename Cfg::LayoutKeys{});
  const auto s_q = [&](int stage) { return make_tensor(make_smem_ptr(tiles.q[stage]), typename Cfg::LayoutRows{}); };
  const auto s_do = [&](int stage) {
    return make_tensor(make_smem_ptr(tiles.dout[stage]), typename Cfg::LayoutRows{});
  };
  const auto s_qt = [&](int stage) { return make_tensor(make_smem_ptr(tiles.q[stage]), typename Cfg::LayoutRowsT{}); };
  const auto s_dot = [&](int stage) {
    return make_tensor(make_smem_ptr(tiles.dout[stage]), typename Cfg::LayoutRowsT{});
  };

  typename Cfg::K::GmemCopy gmem_copy;
  auto gmem_thr = gmem_copy.get_thread_slice(tid);
  Tensor keys_coord = gmem_thr.partition_S(make_identity_tensor(Shape<Int<kKeys>, Int<D>>{}));
  Tensor rows_coord = gmem_thr.partition_S(make_identity_tensor(Shape<Int<kRows>, Int<D>>{}));

  // Step n covers query head kv_head * group + n / q_tiles and the query tile q_begin + (n % q_tiles) * kRows.
  const auto step_head = [&](int n) { return kv_head * group + n / q_tiles; };
  const auto step_q0 = [&](int n) { return q_begin + (n % q_tiles) * kRows; };
  // Issues the cp.async copies of step n's q~ and dout tiles into `stage` and fills its vectors.
  const auto load_step = [&](int n, int stage) {
    const int head = step_head(n);
    const int q0 = step_q0(n);
    const int64_t q_head = head_offset(b, head, p.heads, p.tq, D);
    const auto tile_of = [&](const void* base) {
      return gmem_thr.partition_S(local_tile(global_rows<Elem, D>(base, q_head, p.tq), Shape<Int<kRows>, Int<D>>{},
                                             make_coord(q0 / kRows, 0)));
    };
    Tensor q_dst = gmem_thr.partition_D(s_q(stage));
    Tensor do_dst = gmem_thr.partition_D(s_do(stage));
    copy_rows(gmem_copy, tile_of(p.q_rot), q_dst, rows_coord, lq - q0);
    copy_rows(gmem_copy, tile_of(p.dout), do_dst, rows_coord, lq - q0);
    const int64_t row_base = (int64_t(b) * p.heads + head) * p.tq;
    auto& qv = tiles.vectors[stage];
    for (int c = tid; c < kRows; c += kThreads) {
      const int i = q0 + c;
      const bool inside = i < p.tq;
      qv.lse2[c] = backward_lse2(p.lse + row_base, i, p.tq);
      qv.delta[c] = inside ? p.delta[row_base + i] : 0.0f;
      qv.pitch[c] = inside ? p.fq.pitch[q_feat + i] : 0.0f;
      qv.voiced[c] = inside ? p.fq.voiced[q_feat + i] : 0.0f;
    }
  };

  typename Cfg::K::TiledMma mma;
  auto thr_mma = mma.get_thread_slice(tid);
  Tensor r_k = thr_mma.partition_fragment_A(s_k);
  Tensor r_v = thr_mma.partition_fragment_A(s_v);
  Tensor r_q = thr_mma.partition_fragment_B(s_q(0));
  Tensor r_do = thr_mma.partition_fragment_B(s_do(0));
  Tensor r_qt = transposed_b_fragment<decltype(thr_mma), Elem, D, kRows>(thr_mma, tiles.q[0]);
  Tensor r_dot = transposed_b_fragment<decltype(thr_mma), Elem, D, kRows>(thr_mma, tiles.dout[0]);
  Tensor acc_dv = partition_fragment_C(mma, Shape<Int<kKeys>, Int<D>>{});
  Tensor acc_dk = partition_fragment_C(mma, Shape<Int<kKeys>, Int<D>>{});  // sum of dS^T q~ (times scale at the end)
  clear(acc_dv);
  clear(acc_dk);

  auto ldsm_a = make_tiled_copy_A(typename Cfg::K::Ldsm{}, mma);
  auto ldsm_a_thr = ldsm_a.get_thread_slice(tid);
  auto ldsm_b = make_tiled_copy_B(typename Cfg::K::Ldsm{}, mma);
  auto ldsm_b_thr = ldsm_b.get_thread_slice(tid);
  auto ldsm_bt = make_tiled_copy_B(typename Cfg::K::LdsmT{}, mma);
  auto ldsm_bt_thr = ldsm_bt.get_thread_slice(tid);
  Tensor sk_ldsm = ldsm_a_thr.partition_S(s_k);
  Tensor sv_ldsm = ldsm_a_thr.partition_S(s_v);

  Tensor score_coords = thr_mma.partition_C(make_identity_tensor(Shape<Int<kKeys>, Int<kRows>>{}));
  Tensor score_rc = rows_by_columns_view(score_coords);
  Tensor grad_coords = thr_mma.partition_C(make_identity_tensor(Shape<Int<kKeys>, Int<D>>{}));
  Tensor grad_rc = rows_by_columns_view(grad_coords);
  constexpr int kN = decltype(size<0>(score_rc))::value;
  KeyRows<kN> keys;
#pragma unroll
  for (int r = 0; r < kN; ++r) {
    const int j = k0 + get<0>(score_rc(r, 0));
    keys.index[r] = j;
    keys.pitch[r] = j < p.tk ? p.fk.pitch[k_feat + j] : 0.0f;
    keys.voiced[r] = j < p.tk ? p.fk.voiced[k_feat + j] : 0.0f;
    keys.dpitch[r] = 0.0f;
  }

  if (steps > 0) {
    Tensor k_src = gmem_thr.partition_S(
        local_tile(global_rows<Elem, D>(p.k_rot, k_head, p.tk), Shape<Int<kKeys>, Int<D>>{}, make_coord(k_block, 0)));
    Tensor v_src = gmem_thr.partition_S(
        local_tile(global_rows<Elem, D>(p.v, k_head, p.tk), Shape<Int<kKeys>, Int<D>>{}, make_coord(k_block, 0)));
    Tensor k_dst = gmem_thr.partition_D(s_k);
    Tensor v_dst = gmem_thr.partition_D(s_v);
    copy_rows(gmem_copy, k_src, k_dst, keys_coord, lk - k0);
    copy_rows(gmem_copy, v_src, v_dst, keys_coord, lk - k0);
    load_step(0, 0);
    cp_async_fence();
  }
  for (int n = 0; n < steps; ++n) {
    const int stage = n & 1;
    cp_async_wait<0>();
    __syncthreads();  // this step's tiles and vectors landed; every warp is done with the other stage
    if (n + 1 < steps) {
      load_step(n + 1, stage ^ 1);
      cp_async_fence();
    }
    const int head = step_head(n);
    const int q0 = step_q0(n);
    const BiasArgs bias = bias_args(p.bias, p.alpha[head], beta);

    Tensor acc_s = partition_fragment_C(mma, Shape<Int<kKeys>, Int<kRows>>{});  // S^T, then P^T
    Tensor acc_dp = partition_fragment_C(mma, Shape<Int<kKeys>, Int<kRows>>{});  // dP^T, then dS^T
    clear(acc_s);
    clear(acc_dp);
    gemm_smem(acc_s, r_k, r_q, sk_ldsm, ldsm_b_thr.partition_S(s_q(stage)), mma, ldsm_a, ldsm_a_thr, ldsm_b,
              ldsm_b_thr);
    gemm_smem(acc_dp, r_v, r_do, sv_ldsm, ldsm_b_thr.partition_S(s_do(stage)), mma, ldsm_a, ldsm_a_thr, ldsm_b,
              ldsm_b_thr);
    Tensor s_rc = rows_by_columns_view(acc_s);
    Tensor dp_rc = rows_by_columns_view(acc_dp);
    const auto& qv = tiles.vectors[stage];
    const bool masked = tile_needs_mask(q0, kRows, k0, kKeys, lq, lk, p.causal);
    with_tile_variant(bias.kind, masked, [&](auto kind, auto mask) {
      dkdv_tile<decltype(kind)::value, decltype(mask)::value>(s_rc, dp_rc, score_rc, keys, q0, qv, qk_scale, bias, lq,
                                                              lk, p.causal);
    });

    Tensor r_p = rounded_pairs<T>(acc_s);
    Tensor r_p_a = make_tensor(r_p.data(), accumulator_as_a(r_p.layout()));
    gemm_regs_smem(acc_dv, r_p_a, r_dot, ldsm_bt_thr.partition_S(s_dot(stage)), mma, ldsm_bt, ldsm_bt_thr);
    Tensor r_ds = rounded_pairs<T>(acc_dp);
    Tensor r_ds_a = make_tensor(r_ds.data(), accumulator_as_a(r_ds.layout()));
    gemm_regs_smem(acc_dk, r_ds_a, r_qt, ldsm_bt_thr.partition_S(s_qt(stage)), mma, ldsm_bt, ldsm_bt_thr);
  }

  // Epilogue: key pitch partials and dV straight from registers; dk~ through shared memory to
  // the unrotation (a whole warp per key row).
  const int64_t key_base = (int64_t(b) * p.kv_heads + kv_head) * p.tk;
#pragma unroll
  for (int r = 0; r < kN; ++r) {
    const float dpitch = quad_sum(keys.dpitch[r]);
    if (lane % 4 == 0 && keys.index[r] < p.tk) p.dpitch_k[key_base + keys.index[r]] = dpitch;
  }
  float ones[kN];
#pragma unroll
  for (int r = 0; r < kN; ++r) ones[r] = 1.0f;
  T* dv = static_cast<T*>(p.dv) + k_head;
  Tensor dv_rc = rows_by_columns_view(acc_dv);
  store_rows<T>(dv_rc, grad_rc, ones, dv, D, k0, p.tk);

  Tensor dk_rc = rows_by_columns_view(acc_dk);
  unrotate_gradient_tile<T, D, kKeys>(dk_rc, grad_rc, smem.dk, Cfg::kAccLd, k0, p.tk, lk, p.scale,
                                      static_cast<const T*>(p.k) + k_head, p.fk.pos + k_feat, p.fk.log_theta + k_feat,
                                      p.fk.radius + k_feat, static_cast<T*>(p.dk) + k_head, p.dlog_theta_k + key_base,
                                      p.dradius_k + key_base);
}

// ---- 2. dQ --------------------------------------------------------------------------------------

template <typename T, int D>
__global__ void __launch_bounds__(kThreads) dq_mma_kernel(const Params p) {
  using Cfg = MmaDq<T, D>;
  using Elem = typename Cfg::Elem;
  constexpr int kRows = Cfg::kRows;
  constexpr int kKeys = Cfg::kKeys;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  auto& smem = *reinterpret_cast<typename Cfg::Shared*>(smem_raw);
  auto& tiles = smem.tiles;

  const int tid = threadIdx.x;
  const int lane = tid % kWarpSize;
  const int m_block = blockIdx.x;
  const int head = blockIdx.y;
  const int b = blockIdx.z;
  const int q0 = m_block * kRows;
  const int kv_head = head / (p.heads / p.kv_heads);
  const int lq = clamp_length(p.q_lengths[b], p.tq);
  const int lk = clamp_length(p.k_lengths[b], p.tk);
  const int key_end = key_end_for_query_rows(q0, kRows, lq, lk, p.causal);
  const float qk_scale = p.scale * kLog2e;
  const int64_t q_feat = int64_t(b) * p.tq;
  const int64_t k_feat = int64_t(b) * p.tk;
  const int64_t q_head = head_offset(b, head, p.heads, p.tq, D);
  const int64_t kv_off = head_offset(b, kv_head, p.kv_heads, p.tk, D);
  const int64_t row_base = (int64_t(b) * p.heads + head) * p.tq;

  Tensor s_q = make_tensor(make_smem_ptr(tiles.q), typename Cfg::LayoutRows{});
  Tensor s_do = make_tensor(make_smem_ptr(tiles.dout), typename Cfg::LayoutRows{});
  Tensor s_v = make_tensor(make_smem_ptr(tiles.v), typename Cfg::LayoutKeys{});
  const auto s_k = [&](int stage) { return make_tensor(make_smem_ptr(tiles.k[stage]), typename Cfg::LayoutKeys{}); };
  const auto s_kt = [&](int stage) { return make_tensor(make_smem_ptr(tiles.k[stage]), typename Cfg::LayoutKeysT{}); };

  typename Cfg::K::GmemCopy gmem_copy;
  auto gmem_thr = gmem_copy.get_thread_slice(tid);
  Tensor rows_coord = gmem_thr.partition_S(make_identity_tensor(Shape<Int<kRows>, Int<D>>{}));
  Tensor keys_coord = gmem_thr.partition_S(make_identity_tensor(Shape<Int<kKeys>, Int<D>>{}));
  Tensor m_k = global_rows<Elem, D>(p.k_rot, kv_off, p.tk);
  Tensor m_v = global_rows<Elem, D>(p.v, kv_off, p.tk);
  const auto key_tile = [&](const auto& m, int k0) {
    return gmem_thr.partition_S(local_tile(m, Shape<Int<kKeys>, Int<D>>{}, make_coord(k0 / kKeys, 0)));
  };
  // cp.async copies of the key tile at k0: k~ into `stage`, v into the one v buffer.
  const auto load_k = [&](int k0, int stage) {
    Tensor k_dst = gmem_thr.partition_D(s_k(stage));
    copy_rows(gmem_copy, key_tile(m_k, k0), k_dst, keys_coord, lk - k0);
  };
  const auto load_v = [&](int k0) {
    Tensor v_dst = gmem_thr.partition_D(s_v);
    copy_rows(gmem_copy, key_tile(m_v, k0), v_dst, keys_coord, lk - k0);
  };
  const KeyFeatures<kKeys> key_features{p.fk.pitch + k_feat, p.fk.voiced + k_feat, p.tk};

  typename Cfg::K::TiledMma mma;
  auto thr_mma = mma.get_thread_slice(tid);
  Tensor r_q = thr_mma.partition_fragment_A(s_q);
  Tensor r_do = thr_mma.partition_fragment_A(s_do);
  Tensor r_k = thr_mma.partition_fragment_B(s_k(0));
  Tensor r_v = thr_mma.partition_fragment_B(s_v);
  Tensor r_kt = transposed_b_fragment<decltype(thr_mma), Elem, D, kKeys>(thr_mma, tiles.k[0]);
  Tensor acc_dq = partition_fragment_C(mma, Shape<Int<kRows>, Int<D>>{});  // sum of dS k~ (times scale at the end)
  clear(acc_dq);

  auto ldsm_a = make_tiled_copy_A(typename Cfg::K::Ldsm{}, mma);
  auto ldsm_a_thr = ldsm_a.get_thread_slice(tid);
  auto ldsm_b = make_tiled_copy_B(typename Cfg::K::Ldsm{}, mma);
  auto ldsm_b_thr = ldsm_b.get_thread_slice(tid);
  auto ldsm_bt = make_tiled_copy_B(typename Cfg::K::LdsmT{}, mma);
  auto ldsm_bt_thr = ldsm_bt.get_thread_slice(tid);
  Tensor sq_ldsm = ldsm_a_thr.partition_S(s_q);
  Tensor sdo_ldsm = ldsm_a_thr.partition_S(s_do);
  Tensor sv_ldsm = ldsm_b_thr.partition_S(s_v);

  Tensor score_coords = thr_mma.partition_C(make_identity_tensor(Shape<Int<kRows>, Int<kKeys>>{}));
  Tensor score_rc = rows_by_columns_view(score_coords);
  Tensor grad_coords = thr_mma.partition_C(make_identity_tensor(Shape<Int<kRows>, Int<D>>{}));
  Tensor grad_rc = rows_by_columns_view(grad_coords);
  constexpr int kN = decltype(size<0>(score_rc))::value;
  DqRows<kN> rows;
#pragma unroll
  for (int r = 0; r < kN; ++r) {
    const int i = q0 + get<0>(score_rc(r, 0));
    const bool inside = i < p.tq;
    rows.index[r] = i;
    rows.lse2[r] = backward_lse2(p.lse + row_base, i, p.tq);
    rows.delta[r] = inside ? p.delta[row_base + i] : 0.0f;
    rows.pitch[r] = inside ? p.fq.pitch[q_feat + i] : 0.0f;
    rows.voiced[r] = inside ? p.fq.voiced[q_feat + i] : 0.0f;
    rows.dpitch[r] = rows.dalpha[r] = rows.dbeta[r] = 0.0f;
    rows.p_pitch[r] = rows.p_alpha[r] = rows.p_beta[r] = rows.p_dp[r] = 0.0f;
  }
  const BiasArgs bias = bias_args(p.bias, p.alpha[head], *p.beta);

  if (key_end > 0) {
    Tensor q_src = gmem_thr.partition_S(
        local_tile(global_rows<Elem, D>(p.q_rot, q_head, p.tq), Shape<Int<kRows>, Int<D>>{}, make_coord(m_block, 0)));
    Tensor do_src = gmem_thr.partition_S(
        local_tile(global_rows<Elem, D>(p.dout, q_head, p.tq), Shape<Int<kRows>, Int<D>>{}, make_coord(m_block, 0)));
    Tensor q_dst = gmem_thr.partition_D(s_q);
    Tensor do_dst = gmem_thr.partition_D(s_do);
    copy_rows(gmem_copy, q_src, q_dst, rows_coord, lq - q0);
    copy_rows(gmem_copy, do_src, do_dst, rows_coord, lq - q0);
    load_k(0, 0);
    load_v(0);
    cp_async_fence();
    key_features.store(key_features.fetch(0), tiles.pitch_k, tiles.voiced_k);
  }
  for (int k0 = 0, n = 0; k0 < key_end; k0 += kKeys, ++n) {
    const int stage = n & 1;
    cp_async_wait<0>();
    __syncthreads();  // this tile's k~, v and key features landed; every warp is done with the last tile
    const bool more = k0 + kKeys < key_end;
    if (more) load_k(k0 + kKeys, stage ^ 1);  // committed with the next v below
    const float2 next_features = more ? key_features.fetch(k0 + kKeys) : make_float2(0.0f, 0.0f);

    Tensor acc_s = partition_fragment_C(mma, Shape<Int<kRows>, Int<kKeys>>{});  // S, then dS
    Tensor acc_dp = partition_fragment_C(mma, Shape<Int<kRows>, Int<kKeys>>{});
    clear(acc_s);
    clear(acc_dp);
    gemm_smem(acc_s, r_q, r_k, sq_ldsm, ldsm_b_thr.partition_S(s_k(stage)), mma, ldsm_a, ldsm_a_thr, ldsm_b,
              ldsm_b_thr);
    gemm_smem(acc_dp, r_do, r_v, sdo_ldsm, sv_ldsm, mma, ldsm_a, ldsm_a_thr, ldsm_b, ldsm_b_thr);
    Tensor s_rc = rows_by_columns_view(acc_s);
    Tensor dp_rc = rows_by_columns_view(acc_dp);
    const bool masked = tile_needs_mask(q0, kRows, k0, kKeys, lq, lk, p.causal);
    with_tile_variant(bias.kind, masked, [&](auto kind, auto mask) {
      dq_tile<decltype(kind)::value, decltype(mask)::value>(s_rc, dp_rc, score_rc, rows, k0, tiles.pitch_k,
                                                            tiles.voiced_k, qk_scale, bias, lq, lk, p.causal);
    });

    __syncthreads();  // every warp is done with v and the key features
    if (more) {
      load_v(k0 + kKeys);
      cp_async_fence();
      key_features.store(next_features, tiles.pitch_k, tiles.voiced_k);
    }
    Tensor r_ds = rounded_pairs<T>(acc_s);
    Tensor r_ds_a = make_tensor(r_ds.data(), accumulator_as_a(r_ds.layout()));
    gemm_regs_smem(acc_dq, r_ds_a, r_kt, ldsm_bt_thr.partition_S(s_kt(stage)), mma, ldsm_bt, ldsm_bt_thr);
  }

  // Epilogue: the rows' pitch / alpha / beta partials, then dq~ through shared memory to the
  // unrotation (a whole warp per query row).
#pragma unroll
  for (int r = 0; r < kN; ++r) {
    float dpitch = quad_sum(rows.dpitch[r]);
    float dalpha = quad_sum(rows.dalpha[r]);
    float dbeta = quad_sum(rows.dbeta[r]);
    if (bias.kind != kBiasNone) {
      // As in vrope_bwd.cu: sum_j ds_ij = 0 exactly, so these row sums amplify any error of
      // delta (computed from the rounded output); ds with the float32 sum_j p dp instead of
      // delta is ds + p (delta - sum_j p dp).
      const float correction = rows.delta[r] - quad_sum(rows.p_dp[r]);
      dalpha += correction * quad_sum(rows.p_alpha[r]);
      dbeta += correction * quad_sum(rows.p_beta[r]);
      dpitch += correction * quad_sum(rows.p_pitch[r]);
    }
    const int i = rows.index[r];
    if (lane % 4 == 0 && i < p.tq) {
      p.dpitch_q[row_base + i] = dpitch;
      p.dalpha_rows[row_base + i] = dalpha;
      p.dbeta_rows[row_base + i] = dbeta;
    }
  }

  Tensor dq_rc = rows_by_columns_view(acc_dq);
  unrotate_gradient_tile<T, D, kRows>(dq_rc, grad_rc, smem.dq, Cfg::kAccLd, q0, p.tq, lq, p.scale,
                                      static_cast<const T*>(p.q) + q_head, p.fq.pos + q_feat, p.fq.log_theta + q_feat,
                                      p.fq.radius + q_feat, static_cast<T*>(p.dq) + q_head, p.dlog_theta_q + row_base,
                                      p.dradius_q + row_base);
}

// ---- launch -------------------------------------------------------------------------------------

template <typename Kernel>
void launch_with_shared(Kernel* kernel, dim3 grid, int bytes, const Params& p, cudaStream_t stream) {
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
  kernel<<<grid, kThreads, bytes, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, int D>
void run_backward_mma(const Params& p, cudaStream_t stream) {
  using Dkdv = MmaDkdv<T, D>;
  using Dq = MmaDq<T, D>;
  const dim3 key_grid((p.tk + Dkdv::kKeys - 1) / Dkdv::kKeys, p.kv_heads, p.batch);
  launch_with_shared(dkdv_mma_kernel<T, D>, key_grid, sizeof(typename Dkdv::Shared), p, stream);
  const dim3 query_grid((p.tq + Dq::kRows - 1) / Dq::kRows, p.heads, p.batch);
  launch_with_shared(dq_mma_kernel<T, D>, query_grid, sizeof(typename Dq::Shared), p, stream);
}

template <int D>
constexpr int backward_mma_bytes() {
  const int dkdv = sizeof(typename MmaDkdv<__half, D>::Shared);
  const int dq = sizeof(typename MmaDq<__half, D>::Shared);
  return dkdv > dq ? dkdv : dq;
}

}  // namespace

int backward_mma_shared_memory_bytes(int head_dim) {
  return head_dim == 64 ? backward_mma_bytes<64>() : backward_mma_bytes<128>();
}

void launch_backward_mma(const Params& params, ElementType type, int head_dim, cudaStream_t stream) {
  launch_rotation(params, type, head_dim, stream);
  launch_delta(params, type, head_dim, stream);
  dispatch_type_and_dim(type, head_dim, [&](auto element, auto dim) {
    run_backward_mma<decltype(element), decltype(dim)::value>(params, stream);
  });
}

}  // namespace vrope
}  // namespace echo
