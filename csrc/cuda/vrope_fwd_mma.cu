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

#include <cute/tensor.hpp>

#include "cuda/vrope_common.cuh"

namespace echo {
namespace vrope {
namespace {

using namespace cute;

// CuTe's names for the 16-bit element types (same bits as __half / __nv_bfloat16).
template <typename T>
struct CuteElement;
template <>
struct CuteElement<__half> {
  using type = cute::half_t;
  using Mma = SM80_16x8x16_F32F16F16F32_TN;
};
template <>
struct CuteElement<__nv_bfloat16> {
  using type = cute::bfloat16_t;
  using Mma = SM80_16x8x16_F32BF16BF16F32_TN;
};

// Tile shapes, thread layouts and shared-memory layouts of one (element type, head dim).
template <typename T, int D>
struct MmaForward {
  using Elem = typename CuteElement<T>::type;
  static constexpr int kBlockM = 128;  // query rows per CTA: 4 warps x 2 row groups of 16
  // Keys per tile: at D = 128 a 64-key tile's scores and probabilities (96 registers) on top of
  // the 128-register output accumulator spill; 32 keys fit.
  static constexpr int kBlockN = D == 64 ? 64 : 32;
  static constexpr int kWarps = 4;
  static constexpr int kThreads = kWarps * kWarpSize;
  static_assert(D % 64 == 0, "rows are tiled in 64-element (128-byte) swizzle atoms");

  // Warps stacked along M; the N and K permutation of 16 lets one ldmatrix.x4 feed two atoms.
  using TiledMma = TiledMMA<MMA_Atom<typename CuteElement<T>::Mma>, Layout<Shape<Int<kWarps>, _1, _1>>,
                            Tile<Int<16 * kWarps>, _16, _16>>;

  // 8 rows x 64 elements (128 bytes) with the 16-byte chunks XOR-swizzled by row: the 8 rows an
  // ldmatrix phase reads hit 8 different bank groups.
  using SmemAtom = decltype(composition(Swizzle<3, 3, 3>{}, Layout<Shape<_8, _64>, Stride<_64, _1>>{}));
  using LayoutQ = decltype(tile_to_shape(SmemAtom{}, Shape<Int<kBlockM>, Int<D>>{}));
  using LayoutKV = decltype(tile_to_shape(SmemAtom{}, Shape<Int<kBlockN>, Int<D>>{}));
  // v read as v^T [D][kBlockN] for P . V: (d, n) -> the (n, d) element of the KV layout.
  using LayoutVt = decltype(composition(LayoutKV{}, make_layout(Shape<Int<D>, Int<kBlockN>>{}, GenRowMajor{})));

  // Global -> shared: 16 bytes (8 elements) per thread per copy, 8 threads per 64-element row.
  using GmemCopy = decltype(make_tiled_copy(Copy_Atom<SM80_CP_ASYNC_CACHEGLOBAL<uint128_t>, Elem>{},
                                            Layout<Shape<Int<kThreads / 8>, _8>, Stride<_8, _1>>{},
                                            Layout<Shape<_1, _8>>{}));
  using LdsmAtom = Copy_Atom<SM75_U32x4_LDSM_N, Elem>;
  using LdsmTransposedAtom = Copy_Atom<SM75_U16x8_LDSM_T, Elem>;

  struct Shared {
    alignas(128) Elem q[cosize_v<LayoutQ>];
    alignas(128) Elem k[cosize_v<LayoutKV>];
    alignas(128) Elem v[cosize_v<LayoutKV>];
    alignas(16) float pitch_k[kBlockN];
    alignas(16) float voiced_k[kBlockN];
  };
};

// ---- register-layout views -------------------------------------------------------------------

// An m16n8 accumulator fragment ((2 columns, 2 row halves), MMA_M, MMA_N) viewed as
// (rows = (2, MMA_M), columns = (2, MMA_N)), so row-wise softmax loops are plain 2-D loops.
template <typename Layout>
__device__ __forceinline__ auto rows_by_columns(Layout acc) {
  static_assert(decltype(rank(acc))::value == 3 && decltype(size<0>(acc))::value == 4, "an m16n8 accumulator");
  return make_layout(make_layout(get<0, 1>(acc), get<1>(acc)), make_layout(get<0, 0>(acc), get<2>(acc)));
}

// The same registers as the A operand of an m16n8k16 product: two neighbouring n8 accumulator
// tiles hold exactly the eight values one k16 A fragment wants, in its order.
template <typename Layout>
__device__ __forceinline__ auto accumulator_as_a(Layout acc) {
  auto split = logical_divide(acc, Shape<Underscore, Underscore, _2>{});  // ((2,2), M, (2, N/2))
  return make_layout(make_layout(get<0>(split), get<2, 0>(split)), get<1>(split), get<2, 1>(split));
}

// Max and sum over the four lanes of a quad: they hold the same accumulator rows.
__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(kFullMask, x, 1));
  return fmaxf(x, __shfl_xor_sync(kFullMask, x, 2));
}
__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(kFullMask, x, 1);
  return x + __shfl_xor_sync(kFullMask, x, 2);
}

// ---- copies and products -----------------------------------------------------------------------

// cp.async of a tile's rows [0, valid) (source rows in global memory); rows at or past `valid`
// are zero-filled in shared memory instead of read, so nothing past a length is touched and
// no garbage (v is not zeroed past the length) can reach a product.
template <typename Copy, typename Src, typename Dst, typename Coord>
__device__ __forceinline__ void copy_rows(const Copy& copy_op, const Src& src, Dst& dst, const Coord& coord, int valid) {
#pragma unroll
  for (int m = 0; m < size<1>(dst); ++m) {
    if (get<0>(coord(0, m, 0)) < valid) {
#pragma unroll
      for (int c = 0; c < size<2>(dst); ++c) cute::copy(copy_op, src(_, m, c), dst(_, m, c));
    } else {
      cute::clear(dst(_, m, _));
    }
  }
}

// acc += A . B^T with both operands in shared memory, streamed through registers one k16 slice
// ahead of the tensor cores.
template <typename Acc, typename RegA, typename RegB, typename SmemA, typename SmemB, typename Mma, typename CopyA,
          typename ThrCopyA, typename CopyB, typename ThrCopyB>
__device__ __forceinline__ void gemm_smem(Acc& acc, RegA& ra, RegB& rb, const SmemA& sa, const SmemB& sb, const Mma& mma,
                                          const CopyA& copy_a, const ThrCopyA& thr_a, const CopyB& copy_b,
                                          const ThrCopyB& thr_b) {
  auto ra_view = thr_a.retile_D(ra);
  auto rb_view = thr_b.retile_D(rb);
  cute::copy(copy_a, sa(_, _, _0{}), ra_view(_, _, _0{}));
  cute::copy(copy_b, sb(_, _, _0{}), rb_view(_, _, _0{}));
#pragma unroll
  for (int kk = 0; kk < size<2>(ra); ++kk) {
    if (kk + 1 < size<2>(ra)) {
      cute::copy(copy_a, sa(_, _, kk + 1), ra_view(_, _, kk + 1));
      cute::copy(copy_b, sb(_, _, kk + 1), rb_view(_, _, kk + 1));
    }
    cute::gemm(mma, ra(_, _, kk), rb(_, _, kk), acc);
  }
}

// acc += A . B^T with A already in registers (the probabilities) and B in shared memory.
template <typename Acc, typename RegA, typename RegB, typename SmemB, typename Mma, typename CopyB, typename ThrCopyB>
__device__ __forceinline__ void gemm_regs_smem(Acc& acc, const RegA& ra, RegB& rb, const SmemB& sb, const Mma& mma,
                                               const CopyB& copy_b, const ThrCopyB& thr_b) {
  auto rb_view = thr_b.retile_D(rb);
  cute::copy(copy_b, sb(_, _, _0{}), rb_view(_, _, _0{}));
#pragma unroll
  for (int kk = 0; kk < size<2>(ra); ++kk) {
    if (kk + 1 < size<2>(ra)) cute::copy(copy_b, sb(_, _, kk + 1), rb_view(_, _, kk + 1));
    cute::gemm(mma, ra(_, _, kk), rb(_, _, kk), acc);
  }
}

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

template <bool kMask, typename Scores, typename Coords, int kRows>
__device__ __forceinline__ void tile_logits_for_bias(Scores& s, const Coords& coords, const RowState<kRows>& rows, int k0,
                                                     const float* pitch_k, const float* voiced_k, float qk_scale,
                                                     const BiasArgs& bias, int lq, int lk, bool causal) {
  if (bias.kind == kBiasExp) {
    tile_logits<kBiasExp, kMask>(s, coords, rows, k0, pitch_k, voiced_k, qk_scale, bias, lq, lk, causal);
  } else if (bias.kind == kBiasL1) {
    tile_logits<kBiasL1, kMask>(s, coords, rows, k0, pitch_k, voiced_k, qk_scale, bias, lq, lk, causal);
  } else {
    tile_logits<kBiasNone, kMask>(s, coords, rows, k0, pitch_k, voiced_k, qk_scale, bias, lq, lk, causal);
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

// Probabilities rounded to the element type, two neighbouring columns per 32-bit register, as
// the m16n8k16 A operand packs them.
template <typename T, typename Acc, typename Frag>
__device__ __forceinline__ void round_probabilities(const Acc& acc, Frag& frag) {
  constexpr int kValues = decltype(size(acc))::value;
  static_assert(kValues % 2 == 0, "values come in column pairs");
  auto* pairs = reinterpret_cast<typename Element<T>::Pair*>(frag.data());
#pragma unroll
  for (int n = 0; n < kValues / 2; ++n) pairs[n] = Element<T>::pair(acc(2 * n), acc(2 * n + 1));
}

// ---- the kernel ---------------------------------------------------------------------------------

template <typename T, int D>
__global__ void __launch_bounds__(MmaForward<T, D>::kThreads) vrope_forward_mma_kernel(const Params p) {
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
  const auto rows_of = [](const void* base, int64_t offset, int length) {
    return make_tensor(make_gmem_ptr(static_cast<const Elem*>(base) + offset), make_shape(length, Int<D>{}),
                       make_stride(Int<D>{}, _1{}));
  };
  Tensor m_q = rows_of(p.q_rot, head_offset(b, head, p.heads, p.tq, D), p.tq);
  Tensor m_k = rows_of(p.k_rot, head_offset(b, kv_head, p.kv_heads, p.tk, D), p.tk);
  Tensor m_v = rows_of(p.v, head_offset(b, kv_head, p.kv_heads, p.tk, D), p.tk);
  Tensor g_q = local_tile(m_q, Shape<Int<kBlockM>, Int<D>>{}, make_coord(m_block, 0));

  Tensor s_q = make_tensor(make_smem_ptr(smem.q), typename Cfg::LayoutQ{});
  Tensor s_k = make_tensor(make_smem_ptr(smem.k), typename Cfg::LayoutKV{});
  Tensor s_v = make_tensor(make_smem_ptr(smem.v), typename Cfg::LayoutKV{});
  Tensor s_vt = make_tensor(make_smem_ptr(smem.v), typename Cfg::LayoutVt{});

  typename Cfg::GmemCopy gmem_copy;
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
  // Key features (pitch, voiced) of column `tid` of the tile starting at k0, zero past the
  // sequence: read into registers a tile ahead, while the tensor cores work, and stored to
  // shared memory after the barrier that frees the previous tile's copy.
  static_assert(kBlockN <= Cfg::kThreads, "one key column per thread");
  const auto fetch_key_features = [&](int k0) {
    const int j = k0 + tid;
    const bool inside = tid < kBlockN && j < p.tk;
    return make_float2(inside ? p.fk.pitch[k_feat + j] : 0.0f, inside ? p.fk.voiced[k_feat + j] : 0.0f);
  };
  const auto store_key_features = [&](float2 f) {
    if (tid < kBlockN) {
      smem.pitch_k[tid] = f.x;
      smem.voiced_k[tid] = f.y;
    }
  };

  typename Cfg::TiledMma mma;
  auto thr_mma = mma.get_thread_slice(tid);
  Tensor r_q = thr_mma.partition_fragment_A(s_q);  // (MMA, MMA_M, MMA_K)
  Tensor r_k = thr_mma.partition_fragment_B(s_k);  // (MMA, MMA_N, MMA_K)
  // Fragment shape only: a plain [D][kBlockN] layout (the swizzled v^T view has the same shape).
  Tensor r_vt = thr_mma.partition_fragment_B(
      make_tensor(make_smem_ptr(smem.v), make_layout(Shape<Int<D>, Int<kBlockN>>{}, GenRowMajor{})));
  Tensor acc_o = partition_fragment_C(mma, Shape<Int<kBlockM>, Int<D>>{});  // (MMA, MMA_M, MMA_N)
  clear(acc_o);

  auto ldsm_q = make_tiled_copy_A(typename Cfg::LdsmAtom{}, mma);
  auto ldsm_q_thr = ldsm_q.get_thread_slice(tid);
  Tensor sq_ldsm = ldsm_q_thr.partition_S(s_q);
  auto ldsm_k = make_tiled_copy_B(typename Cfg::LdsmAtom{}, mma);
  auto ldsm_k_thr = ldsm_k.get_thread_slice(tid);
  Tensor sk_ldsm = ldsm_k_thr.partition_S(s_k);
  auto ldsm_v = make_tiled_copy_B(typename Cfg::LdsmTransposedAtom{}, mma);
  auto ldsm_v_thr = ldsm_v.get_thread_slice(tid);
  Tensor svt_ldsm = ldsm_v_thr.partition_S(s_vt);

  // Coordinates (row in the tile, column in the tile) of every accumulator register.
  Tensor score_coords = thr_mma.partition_C(make_identity_tensor(Shape<Int<kBlockM>, Int<kBlockN>>{}));
  Tensor score_rc = make_tensor(score_coords.data(), rows_by_columns(score_coords.layout()));
  Tensor out_coords = thr_mma.partition_C(make_identity_tensor(Shape<Int<kBlockM>, Int<D>>{}));
  Tensor out_rc_coords = make_tensor(out_coords.data(), rows_by_columns(out_coords.layout()));
  Tensor o_rc = make_tensor(acc_o.data(), rows_by_columns(acc_o.layout()));

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
    store_key_features(fetch_key_features(0));
  }
  for (int k0 = 0; k0 < key_end; k0 += kBlockN) {
    Tensor acc_s = partition_fragment_C(mma, Shape<Int<kBlockM>, Int<kBlockN>>{});
    clear(acc_s);
    cp_async_wait<0>();
    __syncthreads();  // k (and q, first time) landed; every warp is done with the previous v
    copy_rows(gmem_copy, key_tile(m_v, k0), tv_s, tkv_coord, lk - k0);
    cp_async_fence();
    const bool more = k0 + kBlockN < key_end;
    const float2 next_features = more ? fetch_key_features(k0 + kBlockN) : make_float2(0.0f, 0.0f);

    gemm_smem(acc_s, r_q, r_k, sq_ldsm, sk_ldsm, mma, ldsm_q, ldsm_q_thr, ldsm_k, ldsm_k_thr);
    Tensor s_rc = make_tensor(acc_s.data(), rows_by_columns(acc_s.layout()));
    const bool mask = q0 + kBlockM > lq || k0 + kBlockN > lk || (p.causal && k0 + kBlockN - 1 > q0 + (lk - lq));
    if (mask) {
      tile_logits_for_bias<true>(s_rc, score_rc, rows, k0, smem.pitch_k, smem.voiced_k, qk_scale, bias, lq, lk,
                                 p.causal);
    } else {
      tile_logits_for_bias<false>(s_rc, score_rc, rows, k0, smem.pitch_k, smem.voiced_k, qk_scale, bias, lq, lk,
                                  p.causal);
    }
    online_softmax(s_rc, o_rc, rows);

    cp_async_wait<0>();
    __syncthreads();  // v landed; every warp is done with this tile's k and key features
    if (more) {
      copy_rows(gmem_copy, key_tile(m_k, k0 + kBlockN), tk_s, tkv_coord, lk - (k0 + kBlockN));
      cp_async_fence();
      store_key_features(next_features);
    }

    Tensor r_p = make_tensor<Elem>(acc_s.layout());
    round_probabilities<T>(acc_s, r_p);
    Tensor r_p_a = make_tensor(r_p.data(), accumulator_as_a(r_p.layout()));
    gemm_regs_smem(acc_o, r_p_a, r_vt, svt_ldsm, mma, ldsm_v, ldsm_v_thr);
  }

  // Epilogue: out = acc / l row by row (0 for rows with no allowed key), lse in natural log.
  T* out = static_cast<T*>(p.out) + head_offset(b, head, p.heads, p.tq, D);
  float* lse = p.lse + (int64_t(b) * p.heads + head) * p.tq;
  const int lane = tid % kWarpSize;
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    const float l = quad_sum(rows.sum[r]);
    const int i = rows.index[r];
    if (i >= p.tq) continue;
    const float inv = l > 0.0f ? 1.0f / l : 0.0f;
    auto* out_row = reinterpret_cast<typename Element<T>::Pair*>(out + int64_t(i) * D);
#pragma unroll
    for (int c = 0; c < size<1>(o_rc); c += 2) {
      const int d = get<1>(out_rc_coords(r, c));  // even; column d + 1 is register c + 1
      out_row[d / 2] = Element<T>::pair(o_rc(r, c) * inv, o_rc(r, c + 1) * inv);
    }
    if (lane % 4 == 0) lse[i] = l > 0.0f ? (rows.max[r] + log2f(l)) * kLn2 : -kInf;
  }
}

template <typename T, int D>
void run_forward_mma(const Params& p, cudaStream_t stream) {
  using Cfg = MmaForward<T, D>;
  constexpr int bytes = sizeof(typename Cfg::Shared);
  auto* kernel = vrope_forward_mma_kernel<T, D>;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
  const dim3 grid((p.tq + Cfg::kBlockM - 1) / Cfg::kBlockM, p.heads, p.batch);
  kernel<<<grid, Cfg::kThreads, bytes, stream>>>(p);
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
