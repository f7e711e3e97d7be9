// Plain-C++ interface between the host glue (vrope_api.cpp, compiled by the host
// compiler with the torch headers) and the CUDA kernels (vrope_fwd.cu / vrope_bwd.cu,
// which include no ATen header so that nvcc stays fast).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace echo {
namespace vrope {

// Element type of q, k, v, out and their gradients.
enum class ElementType { kFloat16, kBFloat16 };

// The pitch-bias kinds, numbered as ops.py passes them.
constexpr int kBiasNone = 0;
constexpr int kBiasExp = 1;
constexpr int kBiasL1 = 2;

// One token side's features: contiguous float32 [B, T] each.
struct FeaturePointers {
  const float* pos;
  const float* log_theta;
  const float* radius;
  const float* pitch;
  const float* voiced;
};

// Everything a launch needs. Tensors are contiguous; q/k/v/out/dout and dq/dk/dv have
// the element type given at launch; every other tensor is float32 (lengths int32).
struct Params {
  // Inputs shared by the forward and the backward.
  const void* q;  // [B, H, Tq, D]
  const void* k;  // [B, Hk, Tk, D]
  const void* v;  // [B, Hk, Tk, D]
  FeaturePointers fq;  // [B, Tq]
  FeaturePointers fk;  // [B, Tk]
  const float* alpha;  // [H]
  const float* beta;  // one element (read on the device: no host sync)
  const int32_t* q_lengths;  // [B]
  const int32_t* k_lengths;  // [B]
  int batch;
  int heads;
  int kv_heads;
  int tq;
  int tk;
  int bias;  // kBiasNone / kBiasExp / kBiasL1
  bool causal;
  float scale;

  // Scratch the rotation prologue fills at the start of every launch_forward / launch_backward:
  // radius_t R(phi_t) x_t of each token in the split layout (rotated evens in columns [0, P),
  // odds in [P, D)), rounded once to the element type, 0 for tokens at or past the batch's
  // length. The attention kernels read their q~ / k~ tiles from here.
  void* q_rot;  // [B, H, Tq, D]
  void* k_rot;  // [B, Hk, Tk, D]

  // Forward outputs; the backward reads them as inputs.
  void* out;  // [B, H, Tq, D]
  float* lse;  // [B, H, Tq], natural log, -inf on rows with no allowed key

  // Backward only.
  const void* dout;  // [B, H, Tq, D]
  float* delta;  // [B, H, Tq] scratch: rowsum(dout * out)
  void* dq;  // [B, H, Tq, D]
  void* dk;  // [B, Hk, Tk, D]
  void* dv;  // [B, Hk, Tk, D]
  // Query-side per-(b, head, row) partials [B, H, Tq], summed by the Python wrapper.
  float* dlog_theta_q;
  float* dradius_q;
  float* dpitch_q;
  float* dalpha_rows;
  float* dbeta_rows;
  // Key-side per-(b, kv head, key) partials [B, Hk, Tk] (already summed over the GQA group).
  float* dlog_theta_k;
  float* dradius_k;
  float* dpitch_k;
};

// Launchers (vrope_fwd.cu, vrope_bwd.cu). head_dim must be 64 or 128; they check every launch.
// Each runs the rotation prologue first, into q_rot and k_rot, then its attention kernels.
void launch_forward(const Params& params, ElementType type, int head_dim, cudaStream_t stream);
void launch_backward(const Params& params, ElementType type, int head_dim, cudaStream_t stream);
// The register-resident CuTe forward (vrope_fwd_mma.cu): same contract and outputs as
// launch_forward; opt-in (ECHO_KERNELS_CUDA_FORWARD=mma) until verified on a GPU.
void launch_forward_mma(const Params& params, ElementType type, int head_dim, cudaStream_t stream);
// The register-resident CuTe backward (vrope_bwd_mma.cu): same contract and outputs as
// launch_backward; opt-in (ECHO_KERNELS_CUDA_BACKWARD=mma) until verified on a GPU.
void launch_backward_mma(const Params& params, ElementType type, int head_dim, cudaStream_t stream);
// delta = rowsum(dout * out) (0 past the query lengths) into Params::delta: the first step of
// both backwards (vrope_bwd.cu).
void launch_delta(const Params& params, ElementType type, int head_dim, cudaStream_t stream);

// Dynamic shared memory (bytes) the largest kernel of each pass needs for head_dim, so the
// Python side can refuse a GPU whose per-block opt-in limit is smaller (e.g. sm86 / sm89).
int forward_shared_memory_bytes(int head_dim);
int backward_shared_memory_bytes(int head_dim);
int forward_mma_shared_memory_bytes(int head_dim);
int backward_mma_shared_memory_bytes(int head_dim);

}  // namespace vrope
}  // namespace echo
