// Fused vRoPE attention forward on CPU: flash-style online softmax over key tiles.
//
// Parallel over (batch, head, query block of kBlockQ rows). Each task rotates its query
// tile once (pre-multiplied by the softmax scale), then walks the key tiles that its
// rows may see (up to Lk, and up to the causal diagonal), rotating each key tile into a
// transposed buffer, adding the pitch bias on the fly and folding the tile into the
// running max / sum / accumulator. Extra memory: per-thread tiles plus the [B, T, D/2]
// rotation tables; never [Tq, Tk].
#include "vrope_common.h"

namespace vrope {
namespace {

template <typename scalar_t, typename acc_t>
class ForwardTask {
 public:
  ForwardTask(const Inputs& in, const Side<acc_t>& sq, const Side<acc_t>& sk, scalar_t* out, acc_t* lse)
      : in_(in), s_(in.shape), sq_(sq), sk_(sk), out_(out), lse_(lse),
        q_(kBlockQ * s_.Dp, acc_t(0)), kt_(round_up(s_.Tk, kBlockK) * s_.Dp, acc_t(0)),
        v_(round_up(s_.Tk, kBlockK) * s_.Dp, acc_t(0)), s_tile_(kBlockQ * kBlockK, acc_t(0)),
        acc_(kBlockQ * s_.Dp, acc_t(0)), keys_(s_.Tk, sk.up != nullptr), m_(kBlockQ),
        l_(kBlockQ), alpha_(in.alpha.data_ptr<acc_t>()), beta_(static_cast<acc_t>(in.beta_value)) {}

  void run(int64_t task) {
    const int64_t n_qb = ceil_div(s_.Tq, kBlockQ);
    const int64_t qb = task % n_qb, h = (task / n_qb) % s_.H, b = task / (n_qb * s_.H);
    const int64_t hk = h / s_.G, i0 = qb * kBlockQ;
    const int64_t rows = std::min(kBlockQ, s_.Tq - i0);
    const int64_t lq = in_.lq[b], lk = in_.lk[b];
    const int64_t valid = std::clamp<int64_t>(lq - i0, 0, rows);
    // Keys past the last valid row's causal limit are never seen by this block.
    const int64_t kend = in_.causal ? std::min(lk, i0 + valid + lk - lq) : lk;
    scalar_t* out = out_ + ((b * s_.H + h) * s_.Tq + i0) * s_.D;
    acc_t* lse = lse_ + (b * s_.H + h) * s_.Tq + i0;
    for (int64_t r = 0; r < rows; ++r) lse[r] = neg_inf<acc_t>();
    std::fill(out, out + rows * s_.D, scalar_t(0));
    if (valid == 0 || kend <= 0) return;

    const int64_t M = round_up(valid, kRows);
    load_queries(b, h, i0, valid, M);
    prepare_keys(b, hk, lk);
    std::fill(m_.begin(), m_.end(), neg_inf<acc_t>());
    std::fill(l_.begin(), l_.end(), acc_t(0));
    std::fill(acc_.begin(), acc_.begin() + M * s_.Dp, acc_t(0));

    for (int64_t j0 = 0; j0 < kend; j0 += kBlockK) {
      const int64_t nk = std::min(kBlockK, kend - j0);
      const int64_t N = round_up(nk, kPad);
      const acc_t* kt = kt_.data() + (j0 / kBlockK) * s_.Dp * kBlockK;
      const KeyPitch<acc_t> keys = keys_.tile(j0);
      // With no voiced key in the tile the pitch bias is exactly 0 there: skip it.
      const bool tile_voiced = keys_.tile_voiced(j0);
      gemm<acc_t>(M, N, s_.Dp, q_.data(), s_.Dp, kt, kBlockK, s_tile_.data(), kBlockK, false);
      for (int64_t r = 0; r < valid; ++r) {
        const int64_t i = i0 + r;
        acc_t* srow = s_tile_.data() + r * kBlockK;
        const BiasRow<acc_t> br = make_bias_row(in_.bias, alpha_[h], beta_, sq_, sq_.token(b, i));
        if (br.active() && tile_voiced) add_bias_row(br, keys, N, srow);
        mask_row(srow, key_limit(i, j0, nk, lq, lk, in_.causal), N);
        online_softmax_row(r, srow, N);
      }
      // Padding rows of the register tile must add nothing.
      std::fill(s_tile_.begin() + valid * kBlockK, s_tile_.begin() + M * kBlockK, acc_t(0));
      gemm<acc_t>(M, s_.Dp, nk, s_tile_.data(), kBlockK, v_.data() + j0 * s_.Dp, s_.Dp, acc_.data(), s_.Dp, true);
    }

    for (int64_t r = 0; r < valid; ++r) {
      if (!(l_[r] > acc_t(0))) continue;  // no allowed key: output 0, lse -inf
      const acc_t inv = acc_t(1) / l_[r];
      const acc_t* a = acc_.data() + r * s_.Dp;
      for (int64_t d = 0; d < s_.D; ++d) out[r * s_.D + d] = static_cast<scalar_t>(a[d] * inv);
      lse[r] = m_[r] + std::log(l_[r]);
    }
  }

 private:
  void load_queries(int64_t b, int64_t h, int64_t i0, int64_t valid, int64_t M) {
    const scalar_t* q = in_.q.data_ptr<scalar_t>() + ((b * s_.H + h) * s_.Tq + i0) * s_.D;
    const acc_t scale = static_cast<acc_t>(in_.scale);
    for (int64_t r = 0; r < valid; ++r) {
      const int64_t t = sq_.token(b, i0 + r);
      rotate_row(q + r * s_.D, sq_.cos + sq_.pair(b, i0 + r), sq_.sin + sq_.pair(b, i0 + r), sq_.radius[t], scale,
                 s_.P, q_.data() + r * s_.Dp, 1);
    }
    std::fill(q_.begin() + valid * s_.Dp, q_.begin() + M * s_.Dp, acc_t(0));
  }

  // Rotated keys of the whole (b, hk) sequence, transposed per key tile to [Dp, kBlockK]
  // (scores = q_tile @ kt), and values [Tk, Dp] in the accumulation type. Consecutive tasks
  // of one thread share (b, hk) (all query blocks of a head, the heads of a GQA group), so
  // this runs once per thread and (b, hk): memory O(threads x Tk x D), identical values
  // whichever thread computes them.
  void prepare_keys(int64_t b, int64_t hk, int64_t lk) {
    const int64_t key = b * s_.Hk + hk;
    if (key == cached_) return;
    cached_ = key;
    const int64_t base = key * s_.Tk * s_.D;
    const scalar_t* k = in_.k.data_ptr<scalar_t>() + base;
    const scalar_t* v = in_.v.data_ptr<scalar_t>() + base;
    for (int64_t j = 0; j < lk; ++j) {
      const int64_t t = sk_.token(b, j), kb = j / kBlockK, c = j % kBlockK;
      rotate_row(k + j * s_.D, sk_.cos + sk_.pair(b, j), sk_.sin + sk_.pair(b, j), sk_.radius[t], acc_t(1), s_.P,
                 kt_.data() + kb * s_.Dp * kBlockK + c, kBlockK);
      load_row(v + j * s_.D, s_.D, v_.data() + j * s_.Dp, 1);
    }
    keys_.load(sk_, b, lk);
  }

  // Folds one row of scores into the running max m, sum l and accumulator; srow becomes P.
  void online_softmax_row(int64_t r, acc_t* srow, int64_t n) {
    const acc_t new_max = std::max(m_[r], row_max(srow, n));
    // A row that has seen no allowed key yet keeps max -inf; shift it by 0 instead.
    const acc_t shift = std::isinf(new_max) ? acc_t(0) : new_max;
    const acc_t sum = exp_row(srow, n, shift);
    const acc_t correction = std::exp(m_[r] - shift);
    l_[r] = l_[r] * correction + sum;
    if (correction != acc_t(1)) scale_row(acc_.data() + r * s_.Dp, s_.Dp, correction);
    m_[r] = new_max;
  }

  const Inputs& in_;
  const Shape s_;
  const Side<acc_t>& sq_;
  const Side<acc_t>& sk_;
  scalar_t* out_;
  acc_t* lse_;
  std::vector<acc_t> q_, kt_, v_, s_tile_, acc_;
  KeyPitchCache<acc_t> keys_;  // bias inputs of the cached keys
  std::vector<acc_t> m_, l_;
  const acc_t* alpha_;
  const acc_t beta_;
  int64_t cached_ = -1;  // (b * Hk + hk) whose keys/values kt_, v_ hold
};

}  // namespace

std::vector<at::Tensor> forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                const std::vector<at::Tensor>& fq, const std::vector<at::Tensor>& fk,
                                const at::Tensor& alpha, const at::Tensor& beta, const at::Tensor& q_lengths,
                                const at::Tensor& k_lengths, int64_t bias, bool causal, double scale) {
  const Inputs in = check_inputs(q, k, v, fq, fk, alpha, beta, q_lengths, k_lengths, bias, causal, scale);
  const Shape& s = in.shape;
  // Every element is written by the tasks (masked rows included).
  at::Tensor out = new_output(q.sizes(), q.options(), in.poison);
  at::Tensor lse = new_output({s.B, s.H, s.Tq}, q.options().dtype(in.stat), in.poison);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "vrope_cpu_forward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const Side<acc_t> sq = make_side<acc_t>(in.fq, s.B, s.Tq, s.D, in.beta_factors);
    const Side<acc_t> sk = make_side<acc_t>(in.fk, s.B, s.Tk, s.D, in.beta_factors);
    scalar_t* out_ptr = out.data_ptr<scalar_t>();
    acc_t* lse_ptr = lse.data_ptr<acc_t>();
    const int64_t tasks = s.B * s.H * ceil_div(s.Tq, kBlockQ);
    at::parallel_for(0, tasks, 1, [&](int64_t lo, int64_t hi) {
      ForwardTask<scalar_t, acc_t> task(in, sq, sk, out_ptr, lse_ptr);
      for (int64_t t = lo; t < hi; ++t) task.run(t);
    });
  });
  return {out, lse};
}

}  // namespace vrope
