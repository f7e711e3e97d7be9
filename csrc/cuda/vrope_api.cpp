// Host glue of the CUDA attention kernels: checks every tensor with TORCH_CHECK, fills the
// plain Params struct and launches on the current stream. Outputs are allocated (and
// NaN-poisoned) by echo_kernels/cuda.py and written here in place; the rotation scratch is
// allocated here.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "cuda/vrope_params.h"

namespace echo {
namespace vrope {
namespace {

constexpr int64_t kMaxGridYZ = 65535;  // heads and batch index the grid's y and z dimensions

void check_cuda(const at::Tensor& t, const at::Tensor& q, const char* name) {
  TORCH_CHECK(t.is_cuda(), "echo_kernels cuda: ", name, " must be a CUDA tensor, got ", t.device());
  TORCH_CHECK(t.device() == q.device(), "echo_kernels cuda: ", name, " is on ", t.device(), ", q on ", q.device());
  TORCH_CHECK(t.is_contiguous(), "echo_kernels cuda: ", name, " must be contiguous");
}

// A q/k/v-like tensor: CUDA, contiguous, q's dtype, this shape, 16-byte aligned (vector loads).
void check_heads(const at::Tensor& t, const at::Tensor& q, const char* name, at::IntArrayRef shape) {
  check_cuda(t, q, name);
  TORCH_CHECK(t.scalar_type() == q.scalar_type(), "echo_kernels cuda: ", name, " has dtype ", t.scalar_type(),
              ", q has ", q.scalar_type());
  TORCH_CHECK(t.sizes() == shape, "echo_kernels cuda: ", name, " has shape ", t.sizes(), ", expected ", shape);
  TORCH_CHECK(reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0, "echo_kernels cuda: ", name,
              " must be 16-byte aligned");
}

void check_float(const at::Tensor& t, const at::Tensor& q, const char* name, at::IntArrayRef shape) {
  check_cuda(t, q, name);
  TORCH_CHECK(t.scalar_type() == at::kFloat, "echo_kernels cuda: ", name, " must be float32, got ", t.scalar_type());
  TORCH_CHECK(t.sizes() == shape, "echo_kernels cuda: ", name, " has shape ", t.sizes(), ", expected ", shape);
}

FeaturePointers features(const std::vector<at::Tensor>& f, const at::Tensor& q, const char* side, int64_t batch,
                         int64_t length) {
  static const char* kNames[] = {"pos", "log_theta", "radius", "pitch", "voiced"};
  TORCH_CHECK(f.size() == 5, "echo_kernels cuda: ", side, " must hold 5 feature tensors, got ", f.size());
  for (size_t n = 0; n < 5; ++n) {
    const std::string name = std::string(side) + "." + kNames[n];
    check_float(f[n], q, name.c_str(), {batch, length});
  }
  return FeaturePointers{f[0].data_ptr<float>(), f[1].data_ptr<float>(), f[2].data_ptr<float>(),
                         f[3].data_ptr<float>(), f[4].data_ptr<float>()};
}

// Checks the inputs shared by forward and backward and fills their part of Params.
Params common_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const std::vector<at::Tensor>& fq,
                     const std::vector<at::Tensor>& fk, const at::Tensor& alpha, const at::Tensor& beta,
                     const at::Tensor& q_lengths, const at::Tensor& k_lengths, int64_t bias, bool causal,
                     double scale) {
  TORCH_CHECK(q.is_cuda(), "echo_kernels cuda: q must be a CUDA tensor, got ", q.device());
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "echo_kernels cuda: q, k, v must be [B, heads, T, D]");
  TORCH_CHECK(q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16,
              "echo_kernels cuda: q must be float16 or bfloat16, got ", q.scalar_type());
  const int64_t batch = q.size(0), heads = q.size(1), tq = q.size(2), dim = q.size(3);
  const int64_t kv_heads = k.size(1), tk = k.size(2);
  TORCH_CHECK(dim == 64 || dim == 128, "echo_kernels cuda: head dim must be 64 or 128, got ", dim);
  TORCH_CHECK(kv_heads > 0 && heads % kv_heads == 0, "echo_kernels cuda: heads (", heads,
              ") must be a multiple of kv heads (", kv_heads, ")");
  TORCH_CHECK(batch <= kMaxGridYZ && heads <= kMaxGridYZ, "echo_kernels cuda: batch and heads must be <= 65535");
  TORCH_CHECK(bias >= kBiasNone && bias <= kBiasL1, "echo_kernels cuda: bias must be 0, 1 or 2, got ", bias);
  check_heads(q, q, "q", {batch, heads, tq, dim});
  check_heads(k, q, "k", {batch, kv_heads, tk, dim});
  check_heads(v, q, "v", {batch, kv_heads, tk, dim});
  check_float(alpha, q, "alpha", {heads});
  check_cuda(beta, q, "beta");
  TORCH_CHECK(beta.scalar_type() == at::kFloat && beta.numel() == 1, "echo_kernels cuda: beta must be one float32");
  const auto check_lengths = [&](const at::Tensor& lengths, const char* name) {
    check_cuda(lengths, q, name);
    TORCH_CHECK(lengths.scalar_type() == at::kInt && lengths.dim() == 1 && lengths.size(0) == batch,
                "echo_kernels cuda: ", name, " must be int32 [B]");
  };
  check_lengths(q_lengths, "q_lengths");
  check_lengths(k_lengths, "k_lengths");

  Params p{};
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.fq = features(fq, q, "fq", batch, tq);
  p.fk = features(fk, q, "fk", batch, tk);
  p.alpha = alpha.data_ptr<float>();
  p.beta = beta.data_ptr<float>();
  p.q_lengths = q_lengths.data_ptr<int32_t>();
  p.k_lengths = k_lengths.data_ptr<int32_t>();
  p.batch = static_cast<int>(batch);
  p.heads = static_cast<int>(heads);
  p.kv_heads = static_cast<int>(kv_heads);
  p.tq = static_cast<int>(tq);
  p.tk = static_cast<int>(tk);
  p.bias = static_cast<int>(bias);
  p.causal = causal;
  p.scale = static_cast<float>(scale);
  return p;
}

ElementType element_type(const at::Tensor& q) {
  return q.scalar_type() == at::kHalf ? ElementType::kFloat16 : ElementType::kBFloat16;
}

bool nothing_to_do(const at::Tensor& q, const at::Tensor& k) { return q.numel() == 0 || k.size(2) == 0; }

// The scratch the rotation prologue fills (Params::q_rot / k_rot), contiguous like q and k.
// It comes from torch's caching allocator on the current stream, which hands freed memory
// only to later work on that stream: holding the tensors until the launches are queued is
// enough. Call under the device guard.
struct RotationScratch {
  at::Tensor q_rot;
  at::Tensor k_rot;
};

RotationScratch rotation_scratch(Params& p, const at::Tensor& q, const at::Tensor& k) {
  RotationScratch scratch{at::empty(q.sizes(), q.options()), at::empty(k.sizes(), k.options())};
  p.q_rot = scratch.q_rot.data_ptr();
  p.k_rot = scratch.k_rot.data_ptr();
  return scratch;
}

// ECHO_KERNELS_CUDA_FORWARD and ECHO_KERNELS_CUDA_BACKWARD pick each pass's kernels: "wmma"
// (default, verified on an H100) or "mma" (the CuTe register-resident kernels,
// vrope_fwd_mma.cu / vrope_bwd_mma.cu, not yet run on a GPU).
bool use_mma(const char* variable) {
  const char* choice = std::getenv(variable);
  if (choice == nullptr || std::strcmp(choice, "wmma") == 0) return false;
  TORCH_CHECK(std::strcmp(choice, "mma") == 0, "echo_kernels cuda: ", variable, " must be 'wmma' or 'mma', got '",
              choice, "'");
  return true;
}

}  // namespace

// Writes out [B, H, Tq, D] and lse [B, H, Tq] (float32).
void forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const std::vector<at::Tensor>& fq,
             const std::vector<at::Tensor>& fk, const at::Tensor& alpha, const at::Tensor& beta,
             const at::Tensor& q_lengths, const at::Tensor& k_lengths, int64_t bias, bool causal, double scale,
             at::Tensor& out, at::Tensor& lse) {
  Params p = common_params(q, k, v, fq, fk, alpha, beta, q_lengths, k_lengths, bias, causal, scale);
  check_heads(out, q, "out", q.sizes());
  check_float(lse, q, "lse", {q.size(0), q.size(1), q.size(2)});
  TORCH_CHECK(!nothing_to_do(q, k), "echo_kernels cuda: empty q or k (the Python wrapper handles these)");
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  const c10::cuda::CUDAGuard guard(q.device());
  const RotationScratch scratch = rotation_scratch(p, q, k);
  const auto launch = use_mma("ECHO_KERNELS_CUDA_FORWARD") ? launch_forward_mma : launch_forward;
  launch(p, element_type(q), static_cast<int>(q.size(3)), c10::cuda::getCurrentCUDAStream().stream());
}

// Writes dq, dk, dv, the five query-side partials [B, H, Tq] (log_theta, radius, pitch,
// alpha rows, beta rows), the three key-side partials [B, Hk, Tk] (log_theta, radius, pitch)
// and the scratch delta [B, H, Tq].
void backward(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
              const at::Tensor& out, const at::Tensor& lse, const std::vector<at::Tensor>& fq,
              const std::vector<at::Tensor>& fk, const at::Tensor& alpha, const at::Tensor& beta,
              const at::Tensor& q_lengths, const at::Tensor& k_lengths, int64_t bias, bool causal, double scale,
              at::Tensor& dq, at::Tensor& dk, at::Tensor& dv, const std::vector<at::Tensor>& q_parts,
              const std::vector<at::Tensor>& k_parts, at::Tensor& delta) {
  Params p = common_params(q, k, v, fq, fk, alpha, beta, q_lengths, k_lengths, bias, causal, scale);
  TORCH_CHECK(!nothing_to_do(q, k), "echo_kernels cuda: empty q or k (the Python wrapper handles these)");
  const std::vector<int64_t> rows{q.size(0), q.size(1), q.size(2)};
  const std::vector<int64_t> keys{k.size(0), k.size(1), k.size(2)};
  check_heads(dout, q, "dout", q.sizes());
  check_heads(out, q, "out", q.sizes());
  check_float(lse, q, "lse", rows);
  check_heads(dq, q, "dq", q.sizes());
  check_heads(dk, q, "dk", k.sizes());
  check_heads(dv, q, "dv", k.sizes());
  check_float(delta, q, "delta", rows);
  TORCH_CHECK(q_parts.size() == 5, "echo_kernels cuda: q_parts must hold 5 tensors");
  TORCH_CHECK(k_parts.size() == 3, "echo_kernels cuda: k_parts must hold 3 tensors");
  for (const auto& t : q_parts) check_float(t, q, "q_parts[i]", rows);
  for (const auto& t : k_parts) check_float(t, q, "k_parts[i]", keys);

  p.dout = dout.data_ptr();
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  p.delta = delta.data_ptr<float>();
  p.dq = dq.data_ptr();
  p.dk = dk.data_ptr();
  p.dv = dv.data_ptr();
  p.dlog_theta_q = q_parts[0].data_ptr<float>();
  p.dradius_q = q_parts[1].data_ptr<float>();
  p.dpitch_q = q_parts[2].data_ptr<float>();
  p.dalpha_rows = q_parts[3].data_ptr<float>();
  p.dbeta_rows = q_parts[4].data_ptr<float>();
  p.dlog_theta_k = k_parts[0].data_ptr<float>();
  p.dradius_k = k_parts[1].data_ptr<float>();
  p.dpitch_k = k_parts[2].data_ptr<float>();
  const c10::cuda::CUDAGuard guard(q.device());
  const RotationScratch scratch = rotation_scratch(p, q, k);
  const auto launch = use_mma("ECHO_KERNELS_CUDA_BACKWARD") ? launch_backward_mma : launch_backward;
  launch(p, element_type(q), static_cast<int>(q.size(3)), c10::cuda::getCurrentCUDAStream().stream());
}

}  // namespace vrope
}  // namespace echo
