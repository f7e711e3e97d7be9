// Flash-style forward of pitch-aware rotary attention (the contract: shared/spec/vrope-attention.md).
//
// The rotation prologue (vrope_rotate.cu) first writes rotated q and k to scratch once; then
// one CTA per (query tile, head, batch) copies its rotated query tile into shared memory and
// walks the rotated key tiles that can be allowed for it (skipping tiles past the key length
// or above the causal diagonal), keeping an exp2-based online softmax. The output accumulator
// lives in shared memory (float32), because WMMA's register layout is opaque and each tile
// rescales the accumulator row by row.
#include <c10/cuda/CUDAException.h>

#include "cuda/vrope_common.cuh"

namespace echo {
namespace vrope {
namespace {

// Shared-memory layout of the forward kernel (byte offsets).
template <int D>
struct ForwardSmem {
  using H = HeadDim<D>;
  static constexpr int kQ = 0;  // rotated q, split layout [kTile][D]
  static constexpr int kK = kQ + H::kTileBytes;  // rotated k, split layout [kTile][D]
  static constexpr int kV = kK + H::kTileBytes;  // v [kTile][D]
  static constexpr int kS = kV + H::kTileBytes;  // float32 scores [kTile][kTile]
  static constexpr int kP = kS + kScoreBytes;  // probabilities in T [kTile][kTile]
  static constexpr int kO = kP + kProbBytes;  // float32 output accumulator [kTile][D]
  static constexpr int kPitchK = kO + H::kAccTileBytes;  // key pitch [kTile]
  static constexpr int kVoicedK = kPitchK + kVectorBytes;  // key voiced [kTile]
  static constexpr int kRowMax = kVoicedK + kVectorBytes;  // running max (log2 units) [kTile]
  static constexpr int kRowSum = kRowMax + kVectorBytes;  // running sum [kTile]
  static constexpr int kBytes = kRowSum + kVectorBytes;
};

template <typename T, int D>
__global__ void __launch_bounds__(kThreads) vrope_forward_kernel(const Params p) {
  using E = Element<T>;
  using H = HeadDim<D>;
  using L = ForwardSmem<D>;
  extern __shared__ __align__(128) unsigned char smem[];
  T* q_tile = reinterpret_cast<T*>(smem + L::kQ);
  T* k_tile = reinterpret_cast<T*>(smem + L::kK);
  T* v_tile = reinterpret_cast<T*>(smem + L::kV);
  float* scores = reinterpret_cast<float*>(smem + L::kS);
  T* probs = reinterpret_cast<T*>(smem + L::kP);
  float* acc = reinterpret_cast<float*>(smem + L::kO);
  float* pitch_k = reinterpret_cast<float*>(smem + L::kPitchK);
  float* voiced_k = reinterpret_cast<float*>(smem + L::kVoicedK);
  float* row_max = reinterpret_cast<float*>(smem + L::kRowMax);
  float* row_sum = reinterpret_cast<float*>(smem + L::kRowSum);

  const int q0 = blockIdx.x * kTile;
  const int head = blockIdx.y;
  const int b = blockIdx.z;
  const int kv_head = head / (p.heads / p.kv_heads);
  const int lq = clamp_length(p.q_lengths[b], p.tq);
  const int lk = clamp_length(p.k_lengths[b], p.tk);

  const T* q_rot = static_cast<const T*>(p.q_rot) + head_offset(b, head, p.heads, p.tq, D);
  const T* k_rot = static_cast<const T*>(p.k_rot) + head_offset(b, kv_head, p.kv_heads, p.tk, D);
  const T* v = static_cast<const T*>(p.v) + head_offset(b, kv_head, p.kv_heads, p.tk, D);
  const int64_t q_feat = int64_t(b) * p.tq;
  const int64_t k_feat = int64_t(b) * p.tk;

  const int warp = threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  // Softmax mapping: lanes 2r and 2r + 1 of warp w share score row 16 w + r, half each.
  const int my_row = warp * kWarpRows + lane / 2;
  const int my_col0 = (lane % 2) * kHalfCols;
  const int i = q0 + my_row;

  load_plain_tile<T, D>(q_tile, q_rot, q0, p.tq);
  for (int idx = threadIdx.x; idx < kTile * H::kAccLd; idx += kThreads) acc[idx] = 0.0f;

  const BiasArgs bias = bias_args(p.bias, p.alpha[head], *p.beta);
  const float pitch_i = i < p.tq ? p.fq.pitch[q_feat + i] : 0.0f;
  const float voiced_i = i < p.tq ? p.fq.voiced[q_feat + i] : 0.0f;
  const float qk_scale = p.scale * kLog2e;

  float m_run = -kInf;  // running row max, log2 units (identical in both lanes of the row)
  float l_run = 0.0f;  // running row sum of exp2(s - m_run)
  const int key_end = key_end_for_query_tile(q0, lq, lk, p.causal);
  for (int k0 = 0; k0 < key_end; k0 += kTile) {
    __syncthreads();  // every warp is done with the previous K/V tile (and, first time, q_tile is written)
    load_plain_tile<T, D>(k_tile, k_rot, k0, p.tk);
    load_plain_tile<T, D>(v_tile, v, k0, lk);  // rows past lk may hold anything, even NaN
    load_vector(pitch_k, p.fk.pitch + k_feat, k0, p.tk, 0.0f);
    load_vector(voiced_k, p.fk.voiced + k_feat, k0, p.tk, 0.0f);
    __syncthreads();

    // Raw scores q~ . k~ of this warp's 16 rows.
    warp_mma_abt<T, D, kTile>(scores + warp * kWarpRows * kScoreLd, kScoreLd, q_tile + warp * kWarpRows * H::kLd,
                              H::kLd, k_tile, H::kLd);
    __syncwarp();

    // Online softmax of my half row, in log2 units; disallowed entries are -inf.
    float s[kHalfCols];
    float tile_max = -kInf;
#pragma unroll
    for (int c = 0; c < kHalfCols; ++c) {
      const int col = my_col0 + c;
      const int j = k0 + col;
      float x = -kInf;
      if (allowed(i, j, lq, lk, p.causal)) {
        x = logit2(scores[my_row * kScoreLd + col], qk_scale, bias, pitch_i, voiced_i, pitch_k[col], voiced_k[col]);
      }
      s[c] = x;
      tile_max = fmaxf(tile_max, x);
    }
    const float m_new = fmaxf(m_run, pair_max(tile_max));
    // A row that has seen no allowed key keeps max -inf: shift it by 0 so exp2 gives 0, not NaN.
    const float shift = m_new == -kInf ? 0.0f : m_new;
    const float correction = exp2f(m_run - shift);
    float tile_sum = 0.0f;
#pragma unroll
    for (int c = 0; c < kHalfCols; ++c) {
      const float prob = exp2f(s[c] - shift);
      tile_sum += prob;
      probs[my_row * kProbLd + my_col0 + c] = E::from_float(prob);
    }
    l_run = l_run * correction + pair_sum(tile_sum);
    m_run = m_new;
    // Rescale my half of the accumulator row before adding this tile's P . V.
    float* acc_row = acc + my_row * H::kAccLd + (lane % 2) * (D / 2);
#pragma unroll 8
    for (int d = 0; d < D / 2; ++d) acc_row[d] *= correction;
    __syncwarp();

    // acc[16 rows][D] += P[16 rows][kTile] . V[kTile][D], accumulator round-tripped through shared memory.
    {
      using namespace nvcuda;
      float* acc_rows = acc + warp * kWarpRows * H::kAccLd;
      const T* p_rows = probs + warp * kWarpRows * kProbLd;
#pragma unroll
      for (int n = 0; n < D; n += kMma) {
        wmma::fragment<wmma::accumulator, kMma, kMma, kMma, float> o;
        wmma::load_matrix_sync(o, acc_rows + n, H::kAccLd, wmma::mem_row_major);
#pragma unroll
        for (int kk = 0; kk < kTile; kk += kMma) {
          wmma::fragment<wmma::matrix_a, kMma, kMma, kMma, T, wmma::row_major> fa;
          wmma::fragment<wmma::matrix_b, kMma, kMma, kMma, T, wmma::row_major> fb;
          wmma::load_matrix_sync(fa, p_rows + kk, kProbLd);
          wmma::load_matrix_sync(fb, v_tile + kk * H::kLd + n, H::kLd);
          wmma::mma_sync(o, fa, fb, o);
        }
        wmma::store_matrix_sync(acc_rows + n, o, H::kAccLd, wmma::mem_row_major);
      }
    }
    __syncwarp();
  }

  // Epilogue: each warp writes its own 16 rows, lanes across the row (coalesced).
  if (lane % 2 == 0) {
    row_max[my_row] = m_run;
    row_sum[my_row] = l_run;
  }
  __syncthreads();  // also covers the accumulator zero-fill when no key tile ran
  T* out = static_cast<T*>(p.out) + head_offset(b, head, p.heads, p.tq, D);
  float* lse = p.lse + (int64_t(b) * p.heads + head) * p.tq;
  for (int r = 0; r < kWarpRows; ++r) {
    const int row = warp * kWarpRows + r;
    const int t = q0 + row;
    if (t >= p.tq) break;
    const float l = row_sum[row];
    // Rows with no allowed key (l = 0): output exactly 0 and lse = -inf.
    const float inv = l > 0.0f ? 1.0f / l : 0.0f;
    const float* acc_row = acc + row * H::kAccLd;
    auto* out_row = reinterpret_cast<typename E::Pair*>(out + int64_t(t) * D);
    for (int m = lane; m < D / 2; m += kWarpSize) out_row[m] = E::pair(acc_row[2 * m] * inv, acc_row[2 * m + 1] * inv);
    if (lane == 0) lse[t] = l > 0.0f ? (row_max[row] + log2f(l)) * kLn2 : -kInf;
  }
}

template <typename T, int D>
void run_forward(const Params& p, cudaStream_t stream) {
  constexpr int bytes = ForwardSmem<D>::kBytes;
  auto* kernel = vrope_forward_kernel<T, D>;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
  const dim3 grid((p.tq + kTile - 1) / kTile, p.heads, p.batch);
  kernel<<<grid, kThreads, bytes, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

int forward_shared_memory_bytes(int head_dim) {
  return head_dim == 64 ? ForwardSmem<64>::kBytes : ForwardSmem<128>::kBytes;
}

void launch_forward(const Params& params, ElementType type, int head_dim, cudaStream_t stream) {
  launch_rotation(params, type, head_dim, stream);
  dispatch_type_and_dim(type, head_dim, [&](auto element, auto dim) {
    run_forward<decltype(element), decltype(dim)::value>(params, stream);
  });
}

}  // namespace vrope
}  // namespace echo
