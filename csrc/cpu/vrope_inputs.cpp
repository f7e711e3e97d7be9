// Validation of the fused CPU kernels' inputs (shared by forward and backward).
#include "vrope_common.h"

#include <string>

namespace vrope {
namespace {

std::vector<int64_t> read_lengths(const at::Tensor& lengths, int64_t batch, int64_t max_len, const char* name) {
  TORCH_CHECK(lengths.device().is_cpu(), name, " must be a CPU tensor");
  TORCH_CHECK(!at::isFloatingType(lengths.scalar_type()) && lengths.scalar_type() != at::kBool,
              name, " must be an integer tensor, got ", lengths.scalar_type());
  TORCH_CHECK(lengths.dim() == 1 && lengths.size(0) == batch, name, " must have shape [", batch, "], got ",
              lengths.sizes());
  const at::Tensor l = lengths.to(at::kLong).contiguous();
  std::vector<int64_t> out(l.data_ptr<int64_t>(), l.data_ptr<int64_t>() + batch);
  for (int64_t b = 0; b < batch; ++b)
    TORCH_CHECK(out[b] >= 0 && out[b] <= max_len, name, "[", b, "] = ", out[b], " is outside [0, ", max_len, "]");
  return out;
}

void check_features(const std::vector<at::Tensor>& f, int64_t batch, int64_t len, at::ScalarType stat,
                    const char* name) {
  static const char* fields[] = {"pos", "log_theta", "radius", "pitch", "voiced"};
  TORCH_CHECK(f.size() == 5, name, " must hold the 5 PitchFeatures tensors, got ", f.size());
  for (size_t n = 0; n < 5; ++n) {
    const at::Tensor& t = f[n];
    TORCH_CHECK(t.device().is_cpu(), name, ".", fields[n], " must be a CPU tensor");
    TORCH_CHECK(t.scalar_type() == stat, name, ".", fields[n], " must be ", stat, " (the stat dtype), got ",
                t.scalar_type());
    TORCH_CHECK(t.dim() == 2 && t.size(0) == batch && t.size(1) == len, name, ".", fields[n],
                " must have shape [", batch, ", ", len, "], got ", t.sizes());
    TORCH_CHECK(t.is_contiguous(), name, ".", fields[n], " must be contiguous");
  }
}

// Whether beta |pitch| <= kExpFactorLimit at every token inside the lengths (pitch [B, T]).
// The padding is never read: it may hold anything, and NaN there must not change the path.
// (A loop, not abs().max(): at short lengths tensor ops are a visible part of a call.)
bool factorisable(const at::Tensor& pitch, const std::vector<int64_t>& lengths, double beta) {
  const int64_t T = pitch.size(1);
  return AT_DISPATCH_FLOATING_TYPES(pitch.scalar_type(), "vrope_factorisable", [&] {
    const scalar_t* p = pitch.data_ptr<scalar_t>();
    for (int64_t b = 0; b < static_cast<int64_t>(lengths.size()); ++b)
      for (int64_t t = 0; t < lengths[b]; ++t)
        if (!(beta * std::abs(static_cast<double>(p[b * T + t])) <= kExpFactorLimit)) return false;
    return true;
  });
}

}  // namespace

Inputs check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const std::vector<at::Tensor>& fq,
                    const std::vector<at::Tensor>& fk, const at::Tensor& alpha, const at::Tensor& beta,
                    const at::Tensor& q_lengths, const at::Tensor& k_lengths, int64_t bias, bool causal,
                    double scale) {
  for (const auto* t : {&q, &k, &v}) {
    TORCH_CHECK(t->device().is_cpu(), "the CPU backend needs CPU tensors, got q/k/v on ", t->device());
    TORCH_CHECK(t->dim() == 4, "q, k and v must be [B, heads, T, D], got ", t->sizes());
    TORCH_CHECK(t->is_contiguous(), "q, k and v must be contiguous");
  }
  const auto dtype = q.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16 || dtype == at::kHalf,
              "the CPU backend supports float32, float64, bfloat16 and float16 q/k/v, got ", dtype);
  TORCH_CHECK(k.scalar_type() == dtype && v.scalar_type() == dtype, "q, k and v must share one dtype");
  const int64_t B = q.size(0), H = q.size(1), Tq = q.size(2), D = q.size(3);
  const int64_t Hk = k.size(1), Tk = k.size(2);
  TORCH_CHECK(k.size(0) == B && v.size(0) == B, "q, k and v must share the batch size");
  TORCH_CHECK(v.size(1) == Hk && v.size(2) == Tk, "k and v must have the same heads and length");
  TORCH_CHECK(k.size(3) == D && v.size(3) == D, "q, k and v must share the head dim D");
  TORCH_CHECK(D > 0 && D % 2 == 0, "head dim D must be even and positive (rotary pairs), got ", D);
  TORCH_CHECK(Hk > 0 && H % Hk == 0, "query heads (", H, ") must be a multiple of key/value heads (", Hk, ")");
  TORCH_CHECK(bias == kBiasNone || bias == kBiasExp || bias == kBiasL1, "bias must be 0 (none), 1 (exp) or 2 (l1), got ",
              bias);
  TORCH_CHECK(std::isfinite(scale), "scale must be finite, got ", scale);

  const at::ScalarType stat = dtype == at::kDouble ? at::kDouble : at::kFloat;
  check_features(fq, B, Tq, stat, "features (query side)");
  check_features(fk, B, Tk, stat, "features_k (key side)");
  TORCH_CHECK(alpha.device().is_cpu() && alpha.scalar_type() == stat && alpha.dim() == 1 && alpha.size(0) == H,
              "alpha must be a CPU ", stat, " tensor of shape [", H, "], got ", alpha.scalar_type(), " ", alpha.sizes());
  TORCH_CHECK(beta.device().is_cpu() && beta.scalar_type() == stat && beta.dim() == 0,
              "beta must be a 0-d CPU ", stat, " tensor, got ", beta.scalar_type(), " ", beta.sizes());

  Inputs in;
  in.q = q;
  in.k = k;
  in.v = v;
  in.fq = fq;
  in.fk = fk;
  in.alpha = alpha.contiguous();
  in.beta = beta;
  in.beta_value = beta.item<double>();
  in.lq = read_lengths(q_lengths, B, Tq, "q_lengths");
  in.lk = read_lengths(k_lengths, B, Tk, "k_lengths");
  in.beta_factors = bias == kBiasExp && in.beta_value >= 0 && factorisable(fq[3], in.lq, in.beta_value) &&
                            factorisable(fk[3], in.lk, in.beta_value)
                        ? in.beta_value
                        : std::numeric_limits<double>::quiet_NaN();
  in.bias = bias;
  in.causal = causal;
  in.scale = scale;
  in.shape = Shape{B, H, Hk, H / Hk, Tq, Tk, D, D / 2, round_up(D, kPad)};
  in.stat = stat;
  in.poison = poisoning();
  return in;
}

}  // namespace vrope
