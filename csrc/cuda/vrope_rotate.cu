// Rotation prologue: writes q~ = radius_t R(phi_t) q_t, and k~ likewise, for every token once
// per launch into scratch (Params::q_rot / k_rot), in the split layout and the rounding of the
// attention kernels' shared-memory tiles. Those kernels then copy rotated tiles instead of
// recomputing exp / sin / cos of a whole tile's angles for every (query tile, key tile) pair.
#include <c10/cuda/CUDAException.h>

#include <algorithm>
#include <cstring>

#include "cuda/vrope_common.cuh"

namespace echo {
namespace vrope {
namespace {

// One token side: x [batch, heads, length, D] and its features, rotated into dst (same shape).
struct RotationSide {
  const void* x;
  void* dst;
  const float* pos;  // [batch, length]
  const float* log_theta;
  const float* radius;
  const int32_t* lengths;  // [batch]
  int batch;
  int heads;
  int length;
};

// A thread rotates kPairs consecutive pairs (m0 .. m0 + kPairs - 1) of one token: it reads them
// as two 16-byte vectors and writes one 16-byte vector of evens at column m0 and one of odds at
// P + m0, so a warp's reads and writes are contiguous runs of whole vectors.
template <typename T, int D>
struct RotationShape {
  static_assert(sizeof(T) == 2, "the packing below assumes 16-bit elements");
  static constexpr int kPairs = 16 / sizeof(T);
  static constexpr int kThreadsPerToken = HeadDim<D>::kPairs / kPairs;
  static_assert(HeadDim<D>::kPairs % kPairs == 0, "a token is a whole number of vectors");
};

template <typename T>
__device__ __forceinline__ float2 unpack_pair(uint32_t bits) {
  typename Element<T>::Pair pair;
  memcpy(&pair, &bits, sizeof(bits));
  return Element<T>::to_float2(pair);
}

// Rounds a and b to T (round to nearest, each on its own) and packs them, a in the low half.
template <typename T>
__device__ __forceinline__ uint32_t pack_pair(float a, float b) {
  const typename Element<T>::Pair pair = Element<T>::pair(a, b);
  uint32_t bits;
  memcpy(&bits, &pair, sizeof(bits));
  return bits;
}

// Tokens at or past their batch's length are written as 0: no score of theirs is ever allowed,
// so any finite value would do, and 0 costs no trig.
template <typename T, int D>
__global__ void __launch_bounds__(kThreads) rotate_rows_kernel(const RotationSide q_side, const RotationSide k_side) {
  using S = RotationShape<T, D>;
  constexpr int P = HeadDim<D>::kPairs;
  const RotationSide s = blockIdx.y == 0 ? q_side : k_side;
  const int64_t idx = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  const int64_t row = idx / S::kThreadsPerToken;  // (b, head, t) flattened
  if (row >= int64_t(s.batch) * s.heads * s.length) return;
  const int m0 = static_cast<int>(idx % S::kThreadsPerToken) * S::kPairs;
  const int t = static_cast<int>(row % s.length);
  const int b = static_cast<int>(row / (int64_t(s.heads) * s.length));

  uint4 even = make_uint4(0u, 0u, 0u, 0u);
  uint4 odd = even;
  if (t < clamp_length(s.lengths[b], s.length)) {
    const int64_t f = int64_t(b) * s.length + t;
    const float pos = s.pos[f];
    const float log_theta = s.log_theta[f];
    const float r = s.radius[f];
    const uint4* src = reinterpret_cast<const uint4*>(static_cast<const T*>(s.x) + row * D + 2 * m0);
    const uint4 lo = src[0];
    const uint4 hi = src[1];
    const uint32_t x[S::kPairs] = {lo.x, lo.y, lo.z, lo.w, hi.x, hi.y, hi.z, hi.w};
    float e[S::kPairs];
    float o[S::kPairs];
#pragma unroll
    for (int c = 0; c < S::kPairs; ++c) {
      const float2 xm = unpack_pair<T>(x[c]);
      const PairRotation rot = pair_rotation<D>(pos, log_theta, m0 + c);
      // Rotated and scaled in float32, rounded once to T (the tensor cores' input).
      e[c] = r * (xm.x * rot.cos - xm.y * rot.sin);
      o[c] = r * (xm.x * rot.sin + xm.y * rot.cos);
    }
    even = make_uint4(pack_pair<T>(e[0], e[1]), pack_pair<T>(e[2], e[3]), pack_pair<T>(e[4], e[5]),
                      pack_pair<T>(e[6], e[7]));
    odd = make_uint4(pack_pair<T>(o[0], o[1]), pack_pair<T>(o[2], o[3]), pack_pair<T>(o[4], o[5]),
                     pack_pair<T>(o[6], o[7]));
  }
  T* dst = static_cast<T*>(s.dst) + row * D;
  *reinterpret_cast<uint4*>(dst + m0) = even;
  *reinterpret_cast<uint4*>(dst + P + m0) = odd;
}

// Both sides in one launch (blockIdx.y picks q or k), sized for the larger one.
template <typename T, int D>
void run_rotation(const Params& p, cudaStream_t stream) {
  using S = RotationShape<T, D>;
  const RotationSide q_side{p.q, p.q_rot, p.fq.pos, p.fq.log_theta, p.fq.radius, p.q_lengths, p.batch, p.heads, p.tq};
  const RotationSide k_side{p.k, p.k_rot, p.fk.pos, p.fk.log_theta, p.fk.radius, p.k_lengths, p.batch, p.kv_heads,
                            p.tk};
  const int64_t rows = int64_t(p.batch) * std::max(int64_t(p.heads) * p.tq, int64_t(p.kv_heads) * p.tk);
  const int64_t threads = rows * S::kThreadsPerToken;
  const dim3 grid(static_cast<unsigned>((threads + kThreads - 1) / kThreads), 2);
  rotate_rows_kernel<T, D><<<grid, kThreads, 0, stream>>>(q_side, k_side);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

void launch_rotation(const Params& params, ElementType type, int head_dim, cudaStream_t stream) {
  dispatch_type_and_dim(type, head_dim, [&](auto element, auto dim) {
    run_rotation<decltype(element), decltype(dim)::value>(params, stream);
  });
}

}  // namespace vrope
}  // namespace echo
