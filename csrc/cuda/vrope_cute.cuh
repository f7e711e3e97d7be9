// CuTe building blocks of the register-resident kernels (vrope_fwd_mma.cu, vrope_bwd_mma.cu):
// the sm80 tensor-core atom and its thread layout, swizzled shared-memory tiles, the cp.async
// and ldmatrix copies, the register-layout views the softmax loops need, and the two product
// shapes (both operands from shared memory; A from registers). One place, so the forward and
// the backward cannot drift apart.
//
// Conventions: a CTA has 4 warps stacked along M (each owns 16-row slices of every M x N
// product), so a row of an accumulator lives in the 4 lanes of a quad. Tiles are [rows][D]
// row-major, 16-bit, in 64-element (128-byte) swizzle atoms.
#pragma once

#include <cute/tensor.hpp>

#include "cuda/vrope_common.cuh"

namespace echo {
namespace vrope {
namespace mma {

using namespace cute;

static_assert(kWarps == 4 && kThreads == 128, "4 warps stacked along M (vrope_common.cuh)");

// CuTe's names for the 16-bit element types (same bits as __half / __nv_bfloat16) and the
// m16n8k16 float32-accumulating atom for each.
template <typename T>
struct CuteElement;
template <>
struct CuteElement<__half> {
  using type = cute::half_t;
  using Atom = SM80_16x8x16_F32F16F16F32_TN;
};
template <>
struct CuteElement<__nv_bfloat16> {
  using type = cute::bfloat16_t;
  using Atom = SM80_16x8x16_F32BF16BF16F32_TN;
};

template <typename T>
struct Kit {
  using Elem = typename CuteElement<T>::type;

  // Warps stacked along M; the N and K permutation of 16 lets one ldmatrix.x4 feed two atoms.
  using TiledMma = TiledMMA<MMA_Atom<typename CuteElement<T>::Atom>, Layout<Shape<Int<kWarps>, _1, _1>>,
                            Tile<Int<16 * kWarps>, _16, _16>>;

  // 8 rows x 64 elements (128 bytes) with the 16-byte chunks XOR-swizzled by row: the 8 rows an
  // ldmatrix phase reads hit 8 different bank groups.
  using SmemAtom = decltype(composition(Swizzle<3, 3, 3>{}, Layout<Shape<_8, _64>, Stride<_64, _1>>{}));
  template <int Rows, int D>
  using SmemTile = decltype(tile_to_shape(SmemAtom{}, Shape<Int<Rows>, Int<D>>{}));
  // The same tile read transposed, [D][Rows]: (d, r) -> element (r, d).
  template <int Rows, int D>
  using SmemTileT = decltype(composition(SmemTile<Rows, D>{}, make_layout(Shape<Int<D>, Int<Rows>>{}, GenRowMajor{})));

  // Global -> shared: 16 bytes (8 elements) per thread per copy, 8 threads per 64-element row.
  using GmemCopy = decltype(make_tiled_copy(Copy_Atom<SM80_CP_ASYNC_CACHEGLOBAL<uint128_t>, Elem>{},
                                            Layout<Shape<Int<kThreads / 8>, _8>, Stride<_8, _1>>{},
                                            Layout<Shape<_1, _8>>{}));
  using Ldsm = Copy_Atom<SM75_U32x4_LDSM_N, Elem>;
  using LdsmT = Copy_Atom<SM75_U16x8_LDSM_T, Elem>;
};

// Global [length][D] row-major rows of one (batch, head), 16-bit.
template <typename Elem, int D>
__device__ __forceinline__ auto global_rows(const void* base, int64_t offset, int length) {
  return make_tensor(make_gmem_ptr(static_cast<const Elem*>(base) + offset), make_shape(length, Int<D>{}),
                     make_stride(Int<D>{}, _1{}));
}

// Register-fragment shape of a B operand read through a transposed [D][Rows] view (the
// swizzled view has the same shape; a plain layout keeps make_fragment_like simple).
template <typename ThrMma, typename Elem, int D, int Rows>
__device__ __forceinline__ auto transposed_b_fragment(const ThrMma& thr_mma, Elem* smem) {
  return thr_mma.partition_fragment_B(
      make_tensor(make_smem_ptr(smem), make_layout(Shape<Int<D>, Int<Rows>>{}, GenRowMajor{})));
}

// ---- register-layout views -------------------------------------------------------------------

// An m16n8 accumulator fragment ((2 columns, 2 row halves), MMA_M, MMA_N) viewed as
// (rows = (2, MMA_M), columns = (2, MMA_N)), so row-wise loops are plain 2-D loops.
template <typename Layout>
__device__ __forceinline__ auto rows_by_columns(Layout acc) {
  static_assert(decltype(rank(acc))::value == 3 && decltype(size<0>(acc))::value == 4, "an m16n8 accumulator");
  return make_layout(make_layout(get<0, 1>(acc), get<1>(acc)), make_layout(get<0, 0>(acc), get<2>(acc)));
}

template <typename Tensor>
__device__ __forceinline__ auto rows_by_columns_view(Tensor& t) {
  return make_tensor(t.data(), rows_by_columns(t.layout()));
}

// The same registers as the A operand of an m16n8k16 product: two neighbouring n8 accumulator
// tiles hold exactly the eight values one k16 A fragment wants, in its order.
template <typename Layout>
__device__ __forceinline__ auto accumulator_as_a(Layout acc) {
  auto split = logical_divide(acc, Shape<Underscore, Underscore, _2>{});  // ((2,2), M, (2, N/2))
  return make_layout(make_layout(get<0>(split), get<2, 0>(split)), get<1>(split), get<2, 1>(split));
}

// Max and sum over the four lanes of a quad: they hold the same accumulator rows. The
// butterfly gives every lane bitwise the same result, in the same order on every run.
__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(kFullMask, x, 1));
  return fmaxf(x, __shfl_xor_sync(kFullMask, x, 2));
}
__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(kFullMask, x, 1);
  return x + __shfl_xor_sync(kFullMask, x, 2);
}

// A float32 accumulator rounded to the element type, two neighbouring columns per 32-bit
// register, as the m16n8k16 A operand packs them (in the accumulator's layout: view it with
// accumulator_as_a to use it as an A operand).
template <typename T, typename Acc>
__device__ __forceinline__ auto rounded_pairs(const Acc& acc) {
  using Elem = typename CuteElement<T>::type;
  constexpr int kValues = decltype(size(acc))::value;
  static_assert(kValues % 2 == 0, "values come in column pairs");
  Tensor frag = make_tensor<Elem>(acc.layout());
  auto* pairs = reinterpret_cast<typename Element<T>::Pair*>(frag.data());
#pragma unroll
  for (int n = 0; n < kValues / 2; ++n) pairs[n] = Element<T>::pair(acc(2 * n), acc(2 * n + 1));
  return frag;
}

// ---- tile variants -----------------------------------------------------------------------------

// Some (query, key) pair of the tile [q0, q0 + rows) x [k0, k0 + keys) is not allowed, so the
// tile needs the per-element mask; inner tiles skip it.
__device__ __forceinline__ bool tile_needs_mask(int q0, int rows, int k0, int keys, int lq, int lk, bool causal) {
  return q0 + rows > lq || k0 + keys > lk || (causal && k0 + keys - 1 > q0 + (lk - lq));
}

// Calls f(integral_constant<int, bias kind>, integral_constant<bool, masked>): the elementwise
// step of a tile is compiled once per bias kind and mask, with neither tested per element.
template <typename F>
__device__ __forceinline__ void with_tile_variant(int bias_kind, bool masked, F&& f) {
  const auto for_kind = [&](auto mask) {
    if (bias_kind == kBiasExp) {
      f(std::integral_constant<int, kBiasExp>{}, mask);
    } else if (bias_kind == kBiasL1) {
      f(std::integral_constant<int, kBiasL1>{}, mask);
    } else {
      f(std::integral_constant<int, kBiasNone>{}, mask);
    }
  };
  if (masked) {
    for_kind(std::true_type{});
  } else {
    for_kind(std::false_type{});
  }
}

// ---- copies and products -----------------------------------------------------------------------

// Pitch and voicing of a key tile, one key per thread (threads past Keys idle), zero past the
// sequence: fetched into registers a tile ahead, while the tensor cores work, and stored to
// shared memory after the barrier that frees the previous tile's copy.
template <int Keys>
struct KeyFeatures {
  static_assert(Keys <= kThreads, "one key column per thread");
  const float* pitch;  // this batch entry's [Tk]
  const float* voiced;
  int tk;

  __device__ __forceinline__ float2 fetch(int k0) const {
    const int c = static_cast<int>(threadIdx.x);
    const bool inside = c < Keys && k0 + c < tk;
    return make_float2(inside ? pitch[k0 + c] : 0.0f, inside ? voiced[k0 + c] : 0.0f);
  }
  __device__ __forceinline__ void store(float2 f, float* pitch_tile, float* voiced_tile) const {
    const int c = static_cast<int>(threadIdx.x);
    if (c < Keys) {
      pitch_tile[c] = f.x;
      voiced_tile[c] = f.y;
    }
  }
};

// cp.async of a tile's rows [0, valid) (source rows in global memory); rows at or past `valid`
// are zero-filled in shared memory instead of read, so nothing past a length is touched and
// no garbage (v and dout are not zeroed past the lengths) can reach a product.
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

// acc += A . B^T with A already in registers (probabilities, dS) and B in shared memory.
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

// Writes a float32 accumulator (rows x columns view and its coordinates) into a row-major
// float32 shared-memory tile with leading dimension ld.
template <typename Acc, typename Coords>
__device__ __forceinline__ void store_accumulator(const Acc& acc, const Coords& coords, float* dst, int ld) {
#pragma unroll
  for (int r = 0; r < size<0>(acc); ++r) {
#pragma unroll
    for (int c = 0; c < size<1>(acc); ++c) dst[get<0>(coords(r, c)) * ld + get<1>(coords(r, c))] = acc(r, c);
  }
}

// Writes rows of a float32 accumulator (rows x columns view) times `scale` to global [T][D] rows
// of the element type, row_base + row for each, skipping rows at or past `limit`; columns d and
// d + 1 of a row sit in registers c and c + 1, so each store is one 32-bit pair.
template <typename T, typename Acc, typename Coords>
__device__ __forceinline__ void store_rows(const Acc& acc, const Coords& coords, const float* row_scale, T* dst, int D,
                                           int row_base, int limit) {
#pragma unroll
  for (int r = 0; r < size<0>(acc); ++r) {
    const int t = row_base + get<0>(coords(r, 0));
    if (t >= limit) continue;
    auto* out_row = reinterpret_cast<typename Element<T>::Pair*>(dst + int64_t(t) * D);
#pragma unroll
    for (int c = 0; c < size<1>(acc); c += 2) {
      const int d = get<1>(coords(r, c));
      out_row[d / 2] = Element<T>::pair(acc(r, c) * row_scale[r], acc(r, c + 1) * row_scale[r]);
    }
  }
}

}  // namespace mma
}  // namespace vrope
}  // namespace echo
