// Register-resident flash forward of pitch-aware rotary attention, on CuTe's sm80 tensor-core
// atoms (the contract: shared/spec/vrope-attention.md). It computes what vrope_fwd.cu computes,
// from the same rotated scratch (vrope_rotate.cu) and the same logit2 / allowed helpers, but
// the way FlashAttention-2 is organised, so the tensor cores are not starved:
//
// * scores, probabilities and the output accumulator stay in registers (mma.sync m16n8k16,
//   float32 accumulation); the softmax rescale is a register multiply, not a shared-memory
//   round trip, and the probabilities feed P . V as the A operand without leaving registers;
// * q, k and v tiles arrive by cp.async into XOR-swizzled shared memory and reach the tensor
//   cores through ldmatrix (transposed for v), so neither side has bank conflicts;
// * the copy of tile n's values overlaps its Q . K^T, and the copy of tile n + 1's keys
//   overlaps tile n's P . V (one K and one V buffer, as FlashAttention-2 does);
// * a tile inside every length and below the causal diagonal skips the per-element mask.
//
// Until a GPU run has checked it against the golden, it is opt-in:
// ECHO_KERNELS_CUDA_FORWARD=mma (vrope_api.cpp); the WMMA kernel stays the default.
#include <c10/cuda/CUDAException.h>

#include "cuda/vrope_cute.cuh"

namespace echo {
namespace vrope {
namespace {

using namespace cute;
using namespace mma;

// Tile shapes and shared memory of one (element type, head dim).
template <typename T, int D>
struct MmaForward {
  using K = Kit<T>;
  using Elem = typename K::Elem;
  static constexpr int kBlockM = 128;  // query rows per CTA: 4 warps x 2 row groups of 16
  // Keys per tile: at D = 128 a 64-key tile's scores and probabilities (96 registers) on top of
  // the 128-register output accumulator spill; 32 keys fit.
  static constexpr int kBlockN = D == 64 ? 64 : 32;
  static_assert(D % 64 == 0, "rows are tiled in 64-element (128-byte) swizzle atoms");
  using LayoutQ = typename K::template SmemTile<kBlockM, D>;
  using LayoutKV = typename K::template SmemTile<kBlockN, D>;
  using LayoutVt = typename K::template SmemTileT<kBlockN, D>;  // v^T [D][kBlockN] for P . V

  struct Shared {
    alignas(128) Elem q[cosize_v<LayoutQ>];
    alignas(128) Elem k[cosize_v<LayoutKV>];
    alignas(128) Elem v[cosize_v<LayoutKV>];
    alignas(16) float pitch_k[kBlockN];
    alignas(16) float voiced_k[kBlockN];
  };
};

// ---- logits ------------------------------------------------------------------------------------

// Per-row values a thread needs for its accumulator rows.
template <int kRows>
struct RowState {
  int index[kRows];  // query index i
  float pitch[kRows];
  float voiced[kRows];
  float max[kRows];  // running max, log2 units
  float sum[kRows];  // running sum of exp2(s - max) over this thread's columns only
};

// Turns raw scores q~ . k~ (rows x columns view) into log2-domain logits: scale, pitch bias
// (logit2, bit for bit what the backward recomputes) and, when kMask, -inf where the
// contract's allowed_ij is false.
template <int kKind, bool kMask, typename Scores, typename Coords, int kRows>
__device__ __forceinline__ void tile_logits(Scores& s, const Coords& coords, const RowState<kRows>& rows, int k0,
                                            const float* pitch_k, const float* voiced_k, float qk_scale,
                                            const BiasArgs& bias, int lq, int lk, bool causal) {
  BiasArgs b = bias;
  b.kind = kKind;  // a compile-time constant for logit2's branches
#pragma unroll
  for (int r = 0; r < size<0>(s); ++r) {
#pragma unroll
    for (int c = 0; c < size<1>(s); ++c) {
      const int col = get<1>(coords(r, c));
      float x = logit2(s(r, c), qk_scale, b, rows.pitch[r], rows.voiced[r], pitch_k[col], voiced_k[col]);
      if (kMask && !allowed(rows.index[r], k0 + col, lq, lk, causal)) x = -kInf;
      s(r, c) = x;
    }
  }
}

// Online softmax step over one tile of logits (rows x columns view): updates the running max
// and sum, rescales the output rows, and leaves exp2(logit - max) in s.
template <typename Scores, typename Out, int kRows>
__device__ __forceinline__ void online_softmax(Scores& s, Out& o, RowState<kRows>& rows) {
#pragma unroll
  for (int r = 0; r < size<0>(s); ++r) {
    float tile_max = rows.max[r];
#pragma unroll
    for (int c = 0; c < size<1>(s); ++c) tile_max = fmaxf(tile_max, s(r, c));
    const float m_new = quad_max(tile_max);
    // A row that has seen no allowed key keeps max -inf: shift it by 0 so exp2 gives 0, not NaN.
    const float shift = m_new == -kInf ? 0.0f : m_new;
    const float correction = exp2f(rows.max[r] - shift);
    rows.max[r] = m_new;
    float sum = rows.sum[r] * correction;
#pragma unroll
    for (int c = 0; c < size<1>(o); ++c) o(r, c) *= correction;
#pragma unroll
    for (int c = 0; c < size<1>(s); ++c) {
      const float prob = exp2f(s(r, c) - shift);
      s(r, c) = prob;
      sum += prob;
    }
    rows.sum[r] = sum;
  }
}

// ---- the kernel ---------------------------------------------------------------------------------

template <typename T, int D>
__global__ void __launch_bounds__(kThreads) vrope_forward_mma_kernel(const Params p) {
  using Cfg = MmaForward<T, D>;
  using Elem = typename Cfg::Elem;
  constexpr int kBlockM = Cfg::kBlockM;
  constexpr int kBlockN = Cfg::kBlockN;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  auto& smem = *reinterpret_cast<typename Cfg::Shared*>(smem_raw);

  const int tid = threadIdx.x;
  const int m_block = blockIdx.x;
  const int head = blockIdx.y;
  const int b = blockIdx.z;
  const int q0 = m_block * kBlockM;
  const int kv_head = head / (p.heads / p.kv_heads);
  const int lq = clamp_length(p.q_lengths[b], p.tq);
  const int lk = clamp_length(p.k_lengths[b], p.tk);
  const int key_end = key_end_for_query_rows(q0, kBlockM, lq, lk, p.causal);

  // Global tensors of this (b, head): rotated q, rotated k, v, all [T][D] row-major.
  Tensor m_q = global_rows<Elem, D>(p.q_rot, head_offset(b, head, p.heads, p.tq, D), p.tq);
  Tensor m_k = global_rows<Elem, D>(p.k_rot, head_offset(b, kv_head, p.kv_heads, p.tk, D), p.tk);
  Tensor m_v = global_rows<Elem, D>(p.v, head_offset(b, kv_head, p.kv_heads, p.tk, D), p.tk);
  Tensor g_q = local_tile(m_q, Shape<Int<kBlockM>, Int<D>>{}, make_coord(m_block, 0));

  Tensor s_q = make_tensor(make_smem_ptr(smem.q), typename Cfg::LayoutQ{});
  Tensor s_k = make_tensor(make_smem_ptr(smem.k), typename Cfg::LayoutKV{});
  Tensor s_v = make_tensor(make_smem_ptr(smem.v), typename Cfg::LayoutKV{});
  Tensor s_vt = make_tensor(make_smem_ptr(smem.v), typename Cfg::LayoutVt{});

  typename Cfg::K::GmemCopy gmem_copy;
  auto gmem_thr = gmem_copy.get_thread_slice(tid);
  Tensor tq_s = gmem_thr.partition_D(s_q);
  Tensor tk_s = gmem_thr.partition_D(s_k);
  Tensor tv_s = gmem_thr.partition_D(s_v);
  Tensor tq_coord = gmem_thr.partition_S(make_identity_tensor(Shape<Int<kBlockM>, Int<D>>{}));
  Tensor tkv_coord = gmem_thr.partition_S(make_identity_tensor(Shape<Int<kBlockN>, Int<D>>{}));
  const auto key_tile = [&](const auto& m, int k0) {
    return gmem_thr.partition_S(local_tile(m, Shape<Int<kBlockN>, Int<D>>{}, make_coord(k0 / kBlockN, 0)));
  };
  const int64_t k_feat = int64_t(b) * p.tk;
  const KeyFeatures<kBlockN> key_features{p.fk.pitch + k_feat, p.fk.voiced + k_feat, p.tk};

  typename Cfg::K::TiledMma mma;
  auto thr_mma = mma.get_thread_slice(tid);
  Tensor r_q = thr_mma.partition_fragment_A(s_q);  // (MMA, MMA_M, MMA_K)
  Tensor r_k = thr_mma.partition_fragment_B(s_k);  // (MMA, MMA_N, MMA_K)
  // Fragment shape only: a plain [D][kBlockN] layout (the swizzled v^T view has the same shape).
  Tensor r_vt = transposed_b_fragment<decltype(thr_mma), Elem, D, kBlockN>(thr_mma, smem.v);
  Tensor acc_o = partition_fragment_C(mma, Shape<Int<kBlockM>, Int<D>>{});  // (MMA, MMA_M, MMA_N)
  clear(acc_o);

  auto ldsm_q = make_tiled_copy_A(typename Cfg::K::Ldsm{}, mma);
  auto ldsm_q_thr = ldsm_q.get_thread_slice(tid);
  Tensor sq_ldsm = ldsm_q_thr.partition_S(s_q);
  auto ldsm_k = make_tiled_copy_B(typename Cfg::K::Ldsm{}, mma);
  auto ldsm_k_thr = ldsm_k.get_thread_slice(tid);
  Tensor sk_ldsm = ldsm_k_thr.partition_S(s_k);
  auto ldsm_v = make_tiled_copy_B(typename Cfg::K::LdsmT{}, mma);
  auto ldsm_v_thr = ldsm_v.get_thread_slice(tid);
  Tensor svt_ldsm = ldsm_v_thr.partition_S(s_vt);

  // Coordinates (row in the tile, column in the tile) of every accumulator register.
  Tensor score_coords = thr_mma.partition_C(make_identity_tensor(Shape<Int<kBlockM>, Int<kBlockN>>{}));
  Tensor score_rc = rows_by_columns_view(score_coords);
  Tensor out_coords = thr_mma.partition_C(make_identity_tensor(Shape<Int<kBlockM>, Int<D>>{}));
  Tensor out_rc_coords = rows_by_columns_view(out_coords);
  Tensor o_rc = rows_by_columns_view(acc_o);

  constexpr int kRows = decltype(size<0>(o_rc))::value;
  RowState<kRows> rows;
  const int64_t q_feat = int64_t(b) * p.tq;
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    const int i = q0 + get<0>(out_rc_coords(r, 0));
    rows.index[r] = i;
    rows.pitch[r] = i < p.tq ? p.fq.pitch[q_feat + i] : 0.0f;
    rows.voiced[r] = i < p.tq ? p.fq.voiced[q_feat + i] : 0.0f;
    rows.max[r] = -kInf;
    rows.sum[r] = 0.0f;
  }
  const BiasArgs bias = bias_args(p.bias, p.alpha[head], *p.beta);
  const float qk_scale = p.scale * kLog2e;

  if (key_end > 0) {
    copy_rows(gmem_copy, gmem_thr.partition_S(g_q), tq_s, tq_coord, lq - q0);
    copy_rows(gmem_copy, key_tile(m_k, 0), tk_s, tkv_coord, lk);
    cp_async_fence();
    key_features.store(key_features.fetch(0), smem.pitch_k, smem.voiced_k);
  }
  for (int k0 = 0; k0 < key_end; k0 += kBlockN) {
    Tensor acc_s = partition_fragment_C(mma, Shape<Int<kBlockM>, Int<kBlockN>>{});
    clear(acc_s);
    cp_async_wait<0>();
    __syncthreads();  // k (and q, first time) landed; every warp is done with the previous v
    copy_rows(gmem_copy, key_tile(m_v, k0), tv_s, tkv_coord, lk - k0);
    cp_async_fence();
    const bool more = k0 + kBlockN < key_end;
    const float2 next_features = more ? key_features.fetch(k0 + kBlockN) : make_float2(0.0f, 0.0f);

    gemm_smem(acc_s, r_q, r_k, sq_ldsm, sk_ldsm, mma, ldsm_q, ldsm_q_thr, ldsm_k, ldsm_k_thr);
    Tensor s_rc = rows_by_columns_view(acc_s);
    const bool masked = tile_needs_mask(q0, kBlockM, k0, kBlockN, lq, lk, p.causal);
    with_tile_variant(bias.kind, masked, [&](auto kind, auto mask) {
      tile_logits<decltype(kind)::value, decltype(mask)::value>(s_rc, score_rc, rows, k0, smem.pitch_k, smem.voiced_k,
                                                                qk_scale, bias, lq, lk, p.causal);
    });
    online_softmax(s_rc, o_rc, rows);

    cp_async_wait<0>();
    __syncthreads();  // v landed; every warp is done with this tile's k and key features
    if (more) {
      copy_rows(gmem_copy, key_tile(m_k, k0 + kBlockN), tk_s, tkv_coord, lk - (k0 + kBlockN));
      cp_async_fence();
      key_features.store(next_features, smem.pitch_k, smem.voiced_k);
    }

    Tensor r_p = rounded_pairs<T>(acc_s);
    Tensor r_p_a = make_tensor(r_p.data(), accumulator_as_a(r_p.layout()));
    gemm_regs_smem(acc_o, r_p_a, r_vt, svt_ldsm, mma, ldsm_v, ldsm_v_thr);
  }

  // Epilogue: out = acc / l row by row (0 for rows with no allowed key), lse in natural log.
  T* out = static_cast<T*>(p.out) + head_offset(b, head, p.heads, p.tq, D);
  float* lse = p.lse + (int64_t(b) * p.heads + head) * p.tq;
  const int lane = tid % kWarpSize;
  float inv[kRows];
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    const float l = quad_sum(rows.sum[r]);
    inv[r] = l > 0.0f ? 1.0f / l : 0.0f;
    const int i = rows.index[r];
    if (lane % 4 == 0 && i < p.tq) lse[i] = l > 0.0f ? (rows.max[r] + log2f(l)) * kLn2 : -kInf;
  }
  store_rows<T>(o_rc, out_rc_coords, inv, out, D, q0, p.tq);
}

template <typename T, int D>
void run_forward_mma(const Params& p, cudaStream_t stream) {
  using Cfg = MmaForward<T, D>;
  constexpr int bytes = sizeof(typename Cfg::Shared);
  auto* kernel = vrope_forward_mma_kernel<T, D>;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
  const dim3 grid((p.tq + Cfg::kBlockM - 1) / Cfg::kBlockM, p.heads, p.batch);
  kernel<<<grid, kThreads, bytes, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

int forward_mma_shared_memory_bytes(int head_dim) {
  return head_dim == 64 ? sizeof(MmaForward<__half, 64>::Shared) : sizeof(MmaForward<__half, 128>::Shared);
}

void launch_forward_mma(const Params& params, ElementType type, int head_dim, cudaStream_t stream) {
  launch_rotation(params, type, head_dim, stream);
  dispatch_type_and_dim(type, head_dim, [&](auto element, auto dim) {
    run_forward_mma<decltype(element), decltype(dim)::value>(params, stream);
  });
}

}  // namespace vrope
}  // namespace echo
