// Fused vRoPE attention forward on CPU: flash-style online softmax over key tiles.
//
// Parallel over (batch, query head, query block of kBlockQ rows); with a single query block,
// over (batch, a few query heads of one GQA group) (heads_per_task). Each task rotates its query
// tile once (pre-multiplied by the softmax scale), then walks the key tiles that its
// rows may see (up to Lk, and up to the causal diagonal), with the keys rotated into a
// transposed buffer, adding the pitch bias on the fly and folding the tile into the
// running max / sum / accumulator. Extra memory: per-thread buffers plus the [B, T, D/2]
// rotation tables; never [Tq, Tk].
//
// Two ways to have the rotated keys, with identical values:
// - several query blocks per head (Tq > kBlockQ): a thread rotates the whole (b, hk) key
//   sequence once and reuses it for all its query blocks and the heads of a GQA group;
// - one query block (decoding: a few new tokens against a long cache): each key tile is
//   rotated just before its scores, into an L1-sized buffer, and serves all the task's heads.
//   Nothing would reuse a whole-sequence copy, and writing then re-reading one (Tk x D per
//   head, beyond L2 at Tk = 4096) cost a decoding step more than its arithmetic.
// And a lone query row (a multi-head decoding step, float sums) rotates no key at all: each key
// meets the query turned by that key's angle (turned_query_scores), the same scores to rounding.
// Values are read in place when they are already rows of the accumulation type.
#include "vrope_common.h"

namespace vrope {
namespace {

// Query heads of one GQA group a task takes together. With one query block per head (a few
// queries, as when decoding) the group's heads share every rotated key tile, so up to kBlockQ
// of their rows go through one pass over the keys (rotated once instead of once per head, in
// taller register tiles); no more heads than leave every thread a task. Each row's arithmetic
// is the same whatever the packing: results do not depend on it, or on the thread count.
int64_t heads_per_task(const Shape& s) {
  if (s.Tq == 0 || s.Tq > kBlockQ || s.G <= 1) return 1;
  const int64_t threads = std::max<int64_t>(at::get_num_threads(), 1);
  return std::clamp<int64_t>(std::min({s.G, kBlockQ / s.Tq, ceil_div(s.B * s.H, threads)}), 1, s.G);
}

template <typename scalar_t, typename acc_t>
class ForwardTask {
 public:
  ForwardTask(const Inputs& in, const Side<acc_t>& sq, const Side<acc_t>& sk, int64_t heads_per_task, scalar_t* out,
              acc_t* lse)
      : in_(in), s_(in.shape), sq_(sq), sk_(sk), hpt_(heads_per_task), out_(out), lse_(lse),
        per_tile_(s_.Tq <= kBlockQ), turned_(scores_turn_query<acc_t>(s_)), q_(kBlockQ * s_.Dp),
        qa_(turned_ ? 2 * s_.P : 0), qb_(turned_ ? 2 * s_.P : 0),
        kt_(turned_ ? 0 : (per_tile_ ? kBlockK : round_up(s_.Tk, kBlockK)) * s_.Dp, acc_t(0)),
        v_(values_in_place() ? 0 : kBlockK * s_.Dp, acc_t(0)), s_tile_(kBlockQ * kBlockK),
        acc_(kBlockQ * s_.Dp, acc_t(0)), keys_(s_.Tk, sk.up != nullptr), m_(kBlockQ),
        l_(kBlockQ), k_data_(in.k.data_ptr<scalar_t>()), v_data_(in.v.data_ptr<scalar_t>()),
        alpha_(in.alpha.data_ptr<acc_t>()), beta_(static_cast<acc_t>(in.beta_value)) {}

  // Tasks: (batch, heads_per_task query heads of one key/value head, query block), the query
  // block fastest, so that consecutive tasks share (b, hk).
  static int64_t count(const Shape& s, int64_t heads_per_task) {
    return s.B * s.Hk * ceil_div(s.G, heads_per_task) * ceil_div(s.Tq, kBlockQ);
  }

  void run(int64_t task) {
    const int64_t n_qb = ceil_div(s_.Tq, kBlockQ), per_group = ceil_div(s_.G, hpt_);
    const int64_t qb = task % n_qb, chunk = (task / n_qb) % (s_.Hk * per_group);
    const int64_t b = task / (n_qb * s_.Hk * per_group), hk = chunk / per_group;
    const int64_t h0 = hk * s_.G + (chunk % per_group) * hpt_, heads = std::min(hpt_, (hk + 1) * s_.G - h0);
    const int64_t i0 = qb * kBlockQ;
    const int64_t rows = std::min(kBlockQ, s_.Tq - i0);
    const int64_t lq = in_.lq[b], lk = in_.lk[b];
    const int64_t valid = std::clamp<int64_t>(lq - i0, 0, rows);
    // Keys past the last valid row's causal limit are never seen by this block.
    const int64_t kend = in_.causal ? std::min(lk, i0 + valid + lk - lq) : lk;
    for (int64_t h = h0; h < h0 + heads; ++h) {
      std::fill_n(lse_ + (b * s_.H + h) * s_.Tq + i0, rows, neg_inf<acc_t>());
      std::fill_n(out_ + ((b * s_.H + h) * s_.Tq + i0) * s_.D, rows * s_.D, scalar_t(0));
    }
    if (valid == 0 || kend <= 0) return;

    // Register-tile row r is query i0 + r % valid of head h0 + r / valid.
    const int64_t M = heads * valid;
    for (int64_t h = h0; h < h0 + heads; ++h) load_queries(b, h, i0, valid, (h - h0) * valid);
    if (turned_) interleave_query(q_.data(), s_.P, qa_.data(), qb_.data());
    load_key_pitch(b, lk);
    if (!per_tile_) rotate_sequence(b, hk, lk);
    std::fill(m_.begin(), m_.end(), neg_inf<acc_t>());
    std::fill(l_.begin(), l_.end(), acc_t(0));
    std::fill(acc_.begin(), acc_.begin() + M * s_.Dp, acc_t(0));

    for (int64_t j0 = 0; j0 < kend; j0 += kBlockK) {
      const int64_t nk = std::min(kBlockK, kend - j0);
      const int64_t N = round_up(nk, kPad);
      const scalar_t* v_tile = kv_rows(v_data_, s_, b, hk, j0);
      prefetch_rows(v_tile, nk, s_.D, s_.D);
      const KeyPitch<acc_t> keys = keys_.tile(j0);
      // With no voiced key in the tile the pitch bias is exactly 0 there: skip it.
      const bool tile_voiced = keys_.tile_voiced(j0);
      score_tile(b, hk, j0, nk, M, N);
      for (int64_t r = 0; r < M; ++r) {
        const int64_t h = h0 + r / valid, i = i0 + r % valid;
        acc_t* srow = s_tile_.data() + r * kBlockK;
        const BiasRow<acc_t> br = make_bias_row(in_.bias, alpha_[h], beta_, sq_, sq_.token(b, i));
        if (br.active() && tile_voiced) add_bias_row(br, keys, N, srow);
        mask_row(srow, key_limit(i, j0, nk, lq, lk, in_.causal), N);
        online_softmax_row(r, srow, N);
      }
      int64_t ldv = 0;
      const acc_t* v = value_rows(v_tile, nk, ldv);
      gemm<acc_t>(M, s_.Dp, nk, s_tile_.data(), kBlockK, v, ldv, acc_.data(), s_.Dp, true);
    }

    for (int64_t r = 0; r < M; ++r) {
      if (!(l_[r] > acc_t(0))) continue;  // no allowed key: output 0, lse -inf
      const int64_t row = (b * s_.H + h0 + r / valid) * s_.Tq + i0 + r % valid;
      const acc_t inv = acc_t(1) / l_[r];
      const acc_t* a = acc_.data() + r * s_.Dp;
      for (int64_t d = 0; d < s_.D; ++d) out_[row * s_.D + d] = static_cast<scalar_t>(a[d] * inv);
      lse_[row] = m_[r] + std::log(l_[r]);
    }
  }

 private:
  // Scores of the M register-tile rows against keys [j0, j0 + nk) into s_tile_ (N columns;
  // those past nk keep finite values, to be masked).
  void score_tile(int64_t b, int64_t hk, int64_t j0, int64_t nk, int64_t M, int64_t N) {
    if (turned_) {
      turned_scores(nk, kv_rows(k_data_, s_, b, hk, j0), sk_, b, j0, qa_.data(), qb_.data(), s_tile_.data());
      return;
    }
    const acc_t* kt =
        per_tile_ ? rotate_keys(b, hk, j0, nk, kt_.data()) : kt_.data() + (j0 / kBlockK) * s_.Dp * kBlockK;
    gemm<acc_t>(M, N, s_.Dp, q_.data(), s_.Dp, kt, kBlockK, s_tile_.data(), kBlockK, false);
  }

  // Queries [i0, i0 + valid) of head h, rotated and scaled, into register-tile rows from row0.
  void load_queries(int64_t b, int64_t h, int64_t i0, int64_t valid, int64_t row0) {
    const scalar_t* q = in_.q.data_ptr<scalar_t>() + ((b * s_.H + h) * s_.Tq + i0) * s_.D;
    const acc_t scale = static_cast<acc_t>(in_.scale);
    for (int64_t r = 0; r < valid; ++r) {
      const int64_t t = sq_.token(b, i0 + r);
      rotate_row(q + r * s_.D, sq_.cos + sq_.pair(b, i0 + r), sq_.sin + sq_.pair(b, i0 + r), sq_.radius[t], scale,
                 s_.P, q_.data() + (row0 + r) * s_.Dp, 1);
    }
  }

  // Rotated keys [j0, j0 + nk) of (b, hk), transposed to [Dp, kBlockK] at kt (scores =
  // q_tile @ kt). Columns past nk keep finite values (zeros or an earlier tile's): their
  // scores are masked.
  const acc_t* rotate_keys(int64_t b, int64_t hk, int64_t j0, int64_t nk, acc_t* kt) const {
    rotate_rows_transposed(nk, kv_rows(k_data_, s_, b, hk, j0), s_.D, sk_.cos + sk_.pair(b, j0),
                           sk_.sin + sk_.pair(b, j0), sk_.radius + sk_.token(b, j0), s_.P, kt, kBlockK);
    return kt;
  }

  // The whole (b, hk) key sequence rotated, tile after tile. Consecutive tasks of one thread
  // share (b, hk) (all query blocks of a head, the heads of a GQA group), so this runs once
  // per thread and (b, hk): memory O(threads x Tk x D), identical values whichever thread
  // computes them.
  void rotate_sequence(int64_t b, int64_t hk, int64_t lk) {
    const int64_t key = b * s_.Hk + hk;
    if (key == rotated_) return;
    rotated_ = key;
    for (int64_t j0 = 0; j0 < lk; j0 += kBlockK)
      rotate_keys(b, hk, j0, std::min(kBlockK, lk - j0), kt_.data() + (j0 / kBlockK) * s_.Dp * kBlockK);
  }

  // The key-side bias inputs, which depend on the batch row only.
  void load_key_pitch(int64_t b, int64_t lk) {
    if (b == pitch_of_) return;
    pitch_of_ = b;
    keys_.load(sk_, b, lk);
  }

  // The nk value rows from v (kv_rows of v_data_) as rows of Dp accumulation-type elements, ld
  // their leading dimension: the input itself when it is that already, else a converted copy.
  const acc_t* value_rows(const scalar_t* v, int64_t nk, int64_t& ld) {
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      if (values_in_place()) {
        ld = s_.D;
        return v;
      }
    }
    for (int64_t j = 0; j < nk; ++j) load_row(v + j * s_.D, s_.D, v_.data() + j * s_.Dp, 1);
    ld = s_.Dp;
    return v_.data();
  }

  // The value product reads Dp columns of each row: the input serves when D is already Dp.
  bool values_in_place() const { return std::is_same_v<scalar_t, acc_t> && s_.D == s_.Dp; }

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
  const int64_t hpt_;  // query heads per task
  scalar_t* out_;
  acc_t* lse_;
  const bool per_tile_;  // keys rotated tile by tile (one query block per head), else per sequence
  const bool turned_;    // keys scored against the query turned by their angles (scores_turn_query)
  std::vector<acc_t> q_, qa_, qb_, kt_, v_, s_tile_, acc_;
  KeyPitchCache<acc_t> keys_;  // bias inputs of the cached keys
  std::vector<acc_t> m_, l_;
  const scalar_t *k_data_, *v_data_;  // the inputs' data (data_ptr checks the dtype on every call)
  const acc_t* alpha_;
  const acc_t beta_;
  int64_t rotated_ = -1;   // b * Hk + hk whose whole key sequence kt_ holds (not per tile)
  int64_t pitch_of_ = -1;  // b whose key-side bias inputs keys_ holds
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
    const int64_t heads = heads_per_task(s);
    using Task = ForwardTask<scalar_t, acc_t>;
    parallel_tasks(
        Task::count(s, heads), [&] { return Task(in, sq, sk, heads, out_ptr, lse_ptr); },
        [](Task& task, int64_t t) { task.run(t); });
  });
  return {out, lse};
}

}  // namespace vrope
