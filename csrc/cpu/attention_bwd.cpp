// Fused vRoPE attention backward on CPU, deterministic without atomics.
//
// Two parallel passes recompute P = exp(S - lse) tile by tile (as FlashAttention does):
//   1. keys pass over (batch, kv head, key block): dV and dK~ for the block, summed over the
//      group's query heads and all query tiles in a fixed order, then unrotated into dk and
//      the key-side radius / log-theta partials; key-side pitch partials from the bias.
//   2. queries pass over (batch, head, query block): dq~, unrotated into dq and the
//      query-side partials, plus per-row alpha / beta / pitch partials.
// Every partial lands in its own slot of a [B, heads, T] buffer and is summed afterwards
// in a fixed order, so the result does not depend on the thread count.
#include "vrope_common.h"

#include <type_traits>

namespace vrope {
namespace {

// Per-token partial gradients, one slot per (batch, head, token) (stat dtype).
template <typename acc_t>
struct Partials {
  at::Tensor buf;  // [kinds, B, heads, T]
  int64_t stride;  // elements per kind
  acc_t* kind(int64_t n) { return buf.data_ptr<acc_t>() + n * stride; }
};

enum QueryPartial { kQRadius, kQLogTheta, kQPitch, kQAlpha, kQBeta, kQKinds };
enum KeyPartial { kKRadius, kKLogTheta, kKPitch, kKKinds };

template <typename scalar_t, typename acc_t>
class BackwardTask {
 public:
  BackwardTask(const Inputs& in, const Side<acc_t>& sq, const Side<acc_t>& sk, const scalar_t* dout,
               const acc_t* lse, acc_t* delta)
      : in_(in), s_(in.shape), sq_(sq), sk_(sk), dout_(dout), lse_(lse), delta_(delta),
        q_(kBlockQ * s_.Dp, acc_t(0)), do_(kBlockQ * s_.Dp, acc_t(0)), k_(kBlockK * s_.Dp, acc_t(0)),
        kt_(s_.Dp * kBlockK, acc_t(0)), vt_(s_.Dp * kBlockK, acc_t(0)), p_(kBlockQ * kBlockK, acc_t(0)),
        ds_(kBlockQ * kBlockK, acc_t(0)), e_(kBlockQ * kBlockK, acc_t(0)), pt_(kBlockK * kBlockQ, acc_t(0)),
        dst_(kBlockK * kBlockQ, acc_t(0)), acc_(kBlockK * s_.Dp, acc_t(0)), acc2_(kBlockK * s_.Dp, acc_t(0)),
        pk_(kBlockK, acc_t(0)), vk_(kBlockK, acc_t(0)), col_(kBlockK, acc_t(0)), lse_safe_(kBlockQ),
        delta_rows_(kBlockQ), alpha_(in.alpha.data_ptr<acc_t>()), beta_(in.beta.item<acc_t>()) {}

  // Pass 1: dK, dV and key-side partials of key block `task` = (b, hk, kb).
  void run_keys(int64_t task, scalar_t* dk_all, scalar_t* dv_all, Partials<acc_t>& part) {
    const int64_t n_kb = ceil_div(s_.Tk, kBlockK);
    const int64_t kb = task % n_kb, hk = (task / n_kb) % s_.Hk, b = task / (n_kb * s_.Hk);
    const int64_t j0 = kb * kBlockK;
    const int64_t lq = in_.lq[b], lk = in_.lk[b];
    const int64_t nk = std::clamp<int64_t>(lk - j0, 0, std::min(kBlockK, s_.Tk - j0));
    if (nk == 0) return;  // keys past Lk get zero gradients (outputs start zeroed)
    const int64_t N = round_up(nk, kPad), Mk = round_up(nk, kRows);
    load_keys(b, hk, j0, nk);
    acc_t* dk_acc = acc_.data();
    acc_t* dv_acc = acc2_.data();
    std::fill(acc_.begin(), acc_.end(), acc_t(0));
    std::fill(acc2_.begin(), acc2_.end(), acc_t(0));
    std::vector<acc_t> dpitch(kBlockK, acc_t(0));
    // Query rows before istart are above the causal diagonal for every key of the block.
    const int64_t istart = in_.causal ? std::max<int64_t>(0, j0 - (lk - lq)) : 0;
    for (int64_t h = hk * s_.G; h < (hk + 1) * s_.G; ++h) {
      std::fill(col_.begin(), col_.end(), acc_t(0));
      for (int64_t i0 = istart; i0 < lq; i0 += kBlockQ) {
        const int64_t nq = std::min(kBlockQ, lq - i0), M = round_up(nq, kRows);
        load_queries(b, h, i0, nq, M);
        probs_and_grads(b, h, i0, nq, M, j0, nk, N, lq, lk, col_.data(), nullptr);
        transpose(p_.data(), kBlockK, M, Mk, pt_.data(), kBlockQ);
        transpose(ds_.data(), kBlockK, M, Mk, dst_.data(), kBlockQ);
        gemm<acc_t>(Mk, s_.Dp, nq, pt_.data(), kBlockQ, do_.data(), s_.Dp, dv_acc, s_.Dp, true);
        gemm<acc_t>(Mk, s_.Dp, nq, dst_.data(), kBlockQ, q_.data(), s_.Dp, dk_acc, s_.Dp, true);
      }
      // dpitch_k = sum over heads and queries of beta * alpha_h * w * sign(pq - pk).
      if (in_.bias != kBiasNone)
        for (int64_t c = 0; c < nk; ++c) dpitch[c] += beta_ * alpha_[h] * col_[c];
    }
    const int64_t base = ((b * s_.Hk + hk) * s_.Tk + j0);
    for (int64_t c = 0; c < nk; ++c) {
      const int64_t t = sk_.token(b, j0 + c), slot = base + c;
      unrotate_row(dk_acc + c * s_.Dp, acc_t(1), in_.k.data_ptr<scalar_t>() + slot * s_.D, sk_.cos + sk_.pair(b, j0 + c),
                   sk_.sin + sk_.pair(b, j0 + c), sk_.phi + sk_.pair(b, j0 + c), sk_.radius[t], s_.P,
                   dk_all + slot * s_.D, part.kind(kKRadius)[slot], part.kind(kKLogTheta)[slot]);
      part.kind(kKPitch)[slot] = dpitch[c];
      for (int64_t d = 0; d < s_.D; ++d) dv_all[slot * s_.D + d] = static_cast<scalar_t>(dv_acc[c * s_.Dp + d]);
    }
  }

  // Pass 2: dq and query-side partials of query block `task` = (b, h, qb).
  void run_queries(int64_t task, scalar_t* dq_all, Partials<acc_t>& part) {
    const int64_t n_qb = ceil_div(s_.Tq, kBlockQ);
    const int64_t qb = task % n_qb, h = (task / n_qb) % s_.H, b = task / (n_qb * s_.H);
    const int64_t hk = h / s_.G, i0 = qb * kBlockQ;
    const int64_t lq = in_.lq[b], lk = in_.lk[b];
    const int64_t nq = std::clamp<int64_t>(lq - i0, 0, std::min(kBlockQ, s_.Tq - i0));
    const int64_t kend = in_.causal ? std::min(lk, i0 + nq + lk - lq) : lk;
    if (nq == 0 || kend <= 0) return;  // rows with no allowed key pass no gradient
    const int64_t M = round_up(nq, kRows);
    load_queries(b, h, i0, nq, M);
    if (kExactDelta) exact_deltas(b, h, hk, i0, nq, M, kend, lq, lk);
    acc_t* dq_acc = acc_.data();
    std::fill(acc_.begin(), acc_.begin() + M * s_.Dp, acc_t(0));
    std::vector<BiasRowGrads<acc_t>> rows(kBlockQ);
    for (int64_t j0 = 0; j0 < kend; j0 += kBlockK) {
      const int64_t nk = std::min(kBlockK, kend - j0), N = round_up(nk, kPad);
      load_keys(b, hk, j0, nk);
      probs_and_grads(b, h, i0, nq, M, j0, nk, N, lq, lk, nullptr, rows.data());
      gemm<acc_t>(M, s_.Dp, nk, ds_.data(), kBlockK, k_.data(), s_.Dp, dq_acc, s_.Dp, true);
    }
    const acc_t scale = static_cast<acc_t>(in_.scale), a = alpha_[h];
    const int64_t base = (b * s_.H + h) * s_.Tq + i0;
    for (int64_t r = 0; r < nq; ++r) {
      const int64_t i = i0 + r, t = sq_.token(b, i), slot = base + r;
      unrotate_row(dq_acc + r * s_.Dp, scale, in_.q.data_ptr<scalar_t>() + slot * s_.D, sq_.cos + sq_.pair(b, i),
                   sq_.sin + sq_.pair(b, i), sq_.phi + sq_.pair(b, i), sq_.radius[t], s_.P, dq_all + slot * s_.D,
                   part.kind(kQRadius)[slot], part.kind(kQLogTheta)[slot]);
      if (in_.bias == kBiasNone) continue;
      const BiasRowGrads<acc_t>& g = rows[r];
      part.kind(kQPitch)[slot] = -beta_ * a * g.w_sign;
      part.kind(kQAlpha)[slot] = in_.bias == kBiasExp ? g.w : -beta_ * g.w_dist;
      part.kind(kQBeta)[slot] = -a * g.w_dist;
    }
  }

 private:
  // With bfloat16/float16 outputs, delta = <dout, out> would inherit out's rounding (a
  // coherent error in every dS, visible in dbeta). Instead sum_j P_ij dP_ij over all key
  // tiles in the stat dtype (two extra tile gemms); the keys pass then reads these deltas.
  static constexpr bool kExactDelta = !std::is_same<scalar_t, acc_t>::value;

  void exact_deltas(int64_t b, int64_t h, int64_t hk, int64_t i0, int64_t nq, int64_t M, int64_t kend, int64_t lq,
                    int64_t lk) {
    std::fill(delta_rows_.begin(), delta_rows_.end(), acc_t(0));
    for (int64_t j0 = 0; j0 < kend; j0 += kBlockK) {
      const int64_t nk = std::min(kBlockK, kend - j0), N = round_up(nk, kPad);
      load_keys(b, hk, j0, nk);
      gemm<acc_t>(M, N, s_.Dp, q_.data(), s_.Dp, kt_.data(), kBlockK, p_.data(), kBlockK, false);
      gemm<acc_t>(M, N, s_.Dp, do_.data(), s_.Dp, vt_.data(), kBlockK, ds_.data(), kBlockK, false);
      for (int64_t r = 0; r < nq; ++r) {
        const int64_t i = i0 + r;
        acc_t* prow = p_.data() + r * kBlockK;
        const BiasRow<acc_t> br{in_.bias, alpha_[h], beta_, sq_.pitch[sq_.token(b, i)], sq_.voiced[sq_.token(b, i)]};
        if (br.active()) add_bias_row(br, pk_.data(), vk_.data(), N, prow, static_cast<acc_t*>(nullptr));
        mask_row(prow, key_limit(i, j0, nk, lq, lk, in_.causal), N);
        exp_row(prow, N, lse_safe_[r]);
        delta_rows_[r] += dot_row(prow, ds_.data() + r * kBlockK, N);
      }
    }
    const int64_t base = (b * s_.H + h) * s_.Tq + i0;
    for (int64_t r = 0; r < nq; ++r) delta_[base + r] = delta_rows_[r];
  }

  // Rotated, scaled queries q_ [M, Dp], dout rows do_ [M, Dp], safe lse and delta per row.
  void load_queries(int64_t b, int64_t h, int64_t i0, int64_t nq, int64_t M) {
    const int64_t base = (b * s_.H + h) * s_.Tq + i0;
    const scalar_t* q = in_.q.data_ptr<scalar_t>() + base * s_.D;
    const acc_t scale = static_cast<acc_t>(in_.scale);
    for (int64_t r = 0; r < nq; ++r) {
      const int64_t t = sq_.token(b, i0 + r);
      rotate_row(q + r * s_.D, sq_.cos + sq_.pair(b, i0 + r), sq_.sin + sq_.pair(b, i0 + r), sq_.radius[t], scale,
                 s_.P, q_.data() + r * s_.Dp, 1);
      load_row(dout_ + (base + r) * s_.D, s_.D, do_.data() + r * s_.Dp, 1);
      // exp(s - (+inf)) = 0 keeps rows without an allowed key (lse = -inf) out of every gradient.
      lse_safe_[r] = std::isinf(lse_[base + r]) ? std::numeric_limits<acc_t>::infinity() : lse_[base + r];
      delta_rows_[r] = delta_[base + r];
    }
    std::fill(q_.begin() + nq * s_.Dp, q_.begin() + M * s_.Dp, acc_t(0));
    std::fill(do_.begin() + nq * s_.Dp, do_.begin() + M * s_.Dp, acc_t(0));
  }

  // Rotated keys k_ [nk, Dp] and transposed kt_ [Dp, kBlockK]; values transposed vt_ [Dp, kBlockK].
  void load_keys(int64_t b, int64_t hk, int64_t j0, int64_t nk) {
    const int64_t base = ((b * s_.Hk + hk) * s_.Tk + j0) * s_.D;
    const scalar_t* k = in_.k.data_ptr<scalar_t>() + base;
    const scalar_t* v = in_.v.data_ptr<scalar_t>() + base;
    for (int64_t c = 0; c < nk; ++c) {
      const int64_t t = sk_.token(b, j0 + c);
      rotate_row(k + c * s_.D, sk_.cos + sk_.pair(b, j0 + c), sk_.sin + sk_.pair(b, j0 + c), sk_.radius[t], acc_t(1),
                 s_.P, k_.data() + c * s_.Dp, 1);
      for (int64_t d = 0; d < s_.D; ++d) kt_[d * kBlockK + c] = k_[c * s_.Dp + d];
      load_row(v + c * s_.D, s_.D, vt_.data() + c, kBlockK);
      pk_[c] = sk_.pitch[t];
      vk_[c] = sk_.voiced[t];
    }
    std::fill(pk_.begin() + nk, pk_.end(), acc_t(0));
    std::fill(vk_.begin() + nk, vk_.end(), acc_t(0));
  }

  // Recomputes P (p_) and dS = P (dP - delta) (ds_) of query rows [i0, i0 + nq) against
  // keys [j0, j0 + nk); rows nq..M-1 become 0. Bias gradient pieces go to `col` (per key)
  // and/or `rows` (per query row).
  void probs_and_grads(int64_t b, int64_t h, int64_t i0, int64_t nq, int64_t M, int64_t j0, int64_t nk, int64_t N,
                       int64_t lq, int64_t lk, acc_t* col, BiasRowGrads<acc_t>* rows) {
    gemm<acc_t>(M, N, s_.Dp, q_.data(), s_.Dp, kt_.data(), kBlockK, p_.data(), kBlockK, false);
    gemm<acc_t>(M, N, s_.Dp, do_.data(), s_.Dp, vt_.data(), kBlockK, ds_.data(), kBlockK, false);
    for (int64_t r = 0; r < nq; ++r) {
      const int64_t i = i0 + r;
      acc_t* prow = p_.data() + r * kBlockK;
      acc_t* dsrow = ds_.data() + r * kBlockK;
      acc_t* erow = e_.data() + r * kBlockK;
      const BiasRow<acc_t> br{in_.bias, alpha_[h], beta_, sq_.pitch[sq_.token(b, i)], sq_.voiced[sq_.token(b, i)]};
      if (br.active()) add_bias_row(br, pk_.data(), vk_.data(), N, prow, erow);
      mask_row(prow, key_limit(i, j0, nk, lq, lk, in_.causal), N);
      exp_row(prow, N, lse_safe_[r]);
      softmax_grad_row(prow, dsrow, N, delta_rows_[r]);
      if (br.active()) {
        const BiasRowGrads<acc_t> g = bias_row_grads(br, dsrow, erow, pk_.data(), vk_.data(), N, col);
        if (rows != nullptr) {
          rows[r].w += g.w;
          rows[r].w_dist += g.w_dist;
          rows[r].w_sign += g.w_sign;
        }
      }
    }
    std::fill(p_.begin() + nq * kBlockK, p_.begin() + M * kBlockK, acc_t(0));
    std::fill(ds_.begin() + nq * kBlockK, ds_.begin() + M * kBlockK, acc_t(0));
  }

  const Inputs& in_;
  const Shape s_;
  const Side<acc_t>& sq_;
  const Side<acc_t>& sk_;
  const scalar_t* dout_;
  const acc_t* lse_;
  acc_t* delta_;
  std::vector<acc_t> q_, do_, k_, kt_, vt_, p_, ds_, e_, pt_, dst_, acc_, acc2_, pk_, vk_, col_, lse_safe_,
      delta_rows_;
  const acc_t* alpha_;
  const acc_t beta_;
};

// delta[b, h, i] = <dout_i, out_i> in the stat dtype.
template <typename scalar_t, typename acc_t>
at::Tensor row_deltas(const at::Tensor& dout, const at::Tensor& out, at::ScalarType stat) {
  const int64_t rows = out.numel() / out.size(-1), D = out.size(-1);
  at::Tensor delta = at::empty(out.sizes().slice(0, 3), out.options().dtype(stat));
  const scalar_t* o = out.data_ptr<scalar_t>();
  const scalar_t* g = dout.data_ptr<scalar_t>();
  acc_t* d = delta.data_ptr<acc_t>();
  at::parallel_for(0, rows, 256, [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r) {
      acc_t s = 0;
      for (int64_t c = 0; c < D; ++c) s += static_cast<acc_t>(g[r * D + c]) * static_cast<acc_t>(o[r * D + c]);
      d[r] = s;
    }
  });
  return delta;
}

// out[b, t] = sum over heads (in order) of part[b, head, t].
template <typename acc_t>
at::Tensor sum_heads(const acc_t* part, int64_t B, int64_t heads, int64_t T, const at::TensorOptions& opts) {
  at::Tensor out = at::zeros({B, T}, opts);
  acc_t* o = out.data_ptr<acc_t>();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < heads; ++h)
      for (int64_t t = 0; t < T; ++t) o[b * T + t] += part[(b * heads + h) * T + t];
  return out;
}

}  // namespace

std::vector<at::Tensor> backward(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                                 const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                                 const std::vector<at::Tensor>& fq, const std::vector<at::Tensor>& fk,
                                 const at::Tensor& alpha, const at::Tensor& beta, const at::Tensor& q_lengths,
                                 const at::Tensor& k_lengths, int64_t bias, bool causal, double scale) {
  const Inputs in = check_inputs(q, k, v, fq, fk, alpha, beta, q_lengths, k_lengths, bias, causal, scale);
  const Shape& s = in.shape;
  TORCH_CHECK(dout.sizes() == q.sizes() && out.sizes() == q.sizes(), "dout and out must have q's shape ", q.sizes());
  TORCH_CHECK(dout.scalar_type() == q.scalar_type() && out.scalar_type() == q.scalar_type(),
              "dout and out must have q's dtype ", q.scalar_type());
  TORCH_CHECK(dout.is_contiguous() && out.is_contiguous() && dout.device().is_cpu() && out.device().is_cpu(),
              "dout and out must be contiguous CPU tensors");
  TORCH_CHECK(lse.scalar_type() == in.stat && lse.dim() == 3 && lse.size(0) == s.B && lse.size(1) == s.H &&
                  lse.size(2) == s.Tq && lse.is_contiguous(),
              "lse must be a contiguous ", in.stat, " tensor [B, H, Tq] from forward");

  at::Tensor dq = at::zeros_like(q), dk = at::zeros_like(k), dv = at::zeros_like(v);
  const auto stat_opts = q.options().dtype(in.stat);
  std::vector<at::Tensor> grads;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "vrope_cpu_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const Side<acc_t> sq = make_side<acc_t>(in.fq, s.B, s.Tq, s.D);
    const Side<acc_t> sk = make_side<acc_t>(in.fk, s.B, s.Tk, s.D);
    const at::Tensor delta = row_deltas<scalar_t, acc_t>(dout, out, in.stat);
    const scalar_t* dout_ptr = dout.data_ptr<scalar_t>();
    const acc_t* lse_ptr = lse.data_ptr<acc_t>();
    acc_t* delta_ptr = delta.data_ptr<acc_t>();
    Partials<acc_t> qpart{at::zeros({kQKinds, s.B, s.H, s.Tq}, stat_opts), s.B * s.H * s.Tq};
    Partials<acc_t> kpart{at::zeros({kKKinds, s.B, s.Hk, s.Tk}, stat_opts), s.B * s.Hk * s.Tk};

    // Queries first: for low-precision inputs it also writes the exact deltas the keys pass reads.
    scalar_t* dq_ptr = dq.data_ptr<scalar_t>();
    at::parallel_for(0, s.B * s.H * ceil_div(s.Tq, kBlockQ), 1, [&](int64_t lo, int64_t hi) {
      BackwardTask<scalar_t, acc_t> task(in, sq, sk, dout_ptr, lse_ptr, delta_ptr);
      for (int64_t t = lo; t < hi; ++t) task.run_queries(t, dq_ptr, qpart);
    });

    scalar_t* dk_ptr = dk.data_ptr<scalar_t>();
    scalar_t* dv_ptr = dv.data_ptr<scalar_t>();
    at::parallel_for(0, s.B * s.Hk * ceil_div(s.Tk, kBlockK), 1, [&](int64_t lo, int64_t hi) {
      BackwardTask<scalar_t, acc_t> task(in, sq, sk, dout_ptr, lse_ptr, delta_ptr);
      for (int64_t t = lo; t < hi; ++t) task.run_keys(t, dk_ptr, dv_ptr, kpart);
    });
    // Fixed-order reductions of the partials.
    at::Tensor dalpha = at::zeros({s.H}, stat_opts);
    at::Tensor dbeta = at::zeros({}, stat_opts);
    acc_t* da = dalpha.data_ptr<acc_t>();
    acc_t db = 0;
    const acc_t* pa = qpart.kind(kQAlpha);
    const acc_t* pb = qpart.kind(kQBeta);
    for (int64_t b = 0; b < s.B; ++b)
      for (int64_t h = 0; h < s.H; ++h)
        for (int64_t i = 0; i < s.Tq; ++i) {
          const int64_t slot = (b * s.H + h) * s.Tq + i;
          da[h] += pa[slot];
          db += pb[slot];
        }
    dbeta.fill_(db);
    grads = {dq,
             dk,
             dv,
             sum_heads(qpart.kind(kQLogTheta), s.B, s.H, s.Tq, stat_opts),
             sum_heads(qpart.kind(kQRadius), s.B, s.H, s.Tq, stat_opts),
             sum_heads(qpart.kind(kQPitch), s.B, s.H, s.Tq, stat_opts),
             sum_heads(kpart.kind(kKLogTheta), s.B, s.Hk, s.Tk, stat_opts),
             sum_heads(kpart.kind(kKRadius), s.B, s.Hk, s.Tk, stat_opts),
             sum_heads(kpart.kind(kKPitch), s.B, s.Hk, s.Tk, stat_opts),
             dalpha,
             dbeta};
  });
  return grads;
}

}  // namespace vrope
