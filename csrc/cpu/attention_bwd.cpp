// Fused vRoPE attention backward on CPU, deterministic without atomics.
//
// Two parallel passes recompute P = exp(S - lse) tile by tile (as FlashAttention does):
//   1. queries pass over (batch, head, query block): dq~, unrotated into dq and the
//      query-side partials, plus per-row alpha / beta / pitch partials (and, for
//      bfloat16/float16, the exact row deltas the keys pass reads).
//   2. keys pass over (batch, kv head, key block): dV and dK~ for the block, summed over the
//      group's query heads and all query tiles in a fixed order, then unrotated into dk and
//      the key-side radius / log-theta partials; key-side pitch partials from the bias.
// Every partial lands in its own slot of a [B, heads, T] buffer and is summed afterwards
// in a fixed order, so the result does not depend on the thread count.
//
// Both passes walk the other side's whole sequence once per task. Rotating (and converting,
// transposing) those tiles again for every task would cost as much as a gemm, so each thread
// keeps the other side of its current (batch, kv head) prepared once, as the forward does:
// consecutive tasks of a thread share it (tasks are ordered block-fastest). The caches are
// pure functions of (b, kv head), so which thread fills them never changes a bit of the result.
// Extra memory per thread: keys 3 x Tk x D, queries 2 x (H / Hk) x Tq x D; never [Tq, Tk].
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

// Query rows of one tile, as the score tiles read them (row r at r * Dp; rows of the
// register-tile padding must be readable, their results are discarded).
template <typename acc_t>
struct QueryRows {
  const acc_t* q;      // rotated queries times the softmax scale [rows, Dp]
  const acc_t* dout;   // dout in the accumulation type [rows, Dp]
  const acc_t* lse;    // log-sum-exp per row, +inf for rows without an allowed key
  const acc_t* delta;  // sum_j P_ij dP_ij per row
};

// One key tile of the (b, hk) key cache.
template <typename acc_t>
struct KeyTile {
  const acc_t* kt;  // rotated keys transposed [Dp, kBlockK]
  const acc_t* vt;  // values transposed [Dp, kBlockK]
  const acc_t* k;   // rotated keys [nk, Dp] (for dq = dS K)
  const acc_t* pitch;
  const acc_t* voiced;
  bool any_voiced;  // some key of the tile is voiced (else the pitch bias is 0 on the whole tile)
};

template <typename scalar_t, typename acc_t>
class BackwardTask {
 public:
  BackwardTask(const Inputs& in, const Side<acc_t>& sq, const Side<acc_t>& sk, const scalar_t* dout,
               const acc_t* lse, acc_t* delta)
      : in_(in), s_(in.shape), sq_(sq), sk_(sk), dout_(dout), lse_(lse), delta_(delta),
        n_kb_(ceil_div(s_.Tk, kBlockK)), p_(kBlockQ * kBlockK, acc_t(0)), ds_(kBlockQ * kBlockK, acc_t(0)),
        e_(kBlockQ * kBlockK, acc_t(0)), acc_(kBlockQ * s_.Dp, acc_t(0)), acc2_(kBlockK * s_.Dp, acc_t(0)), col_(kBlockK, acc_t(0)),
        dpitch_(kBlockK, acc_t(0)), rows_(kBlockQ), alpha_(in.alpha.data_ptr<acc_t>()),
        beta_(static_cast<acc_t>(in.beta_value)) {}

  // Pass 1: dq and query-side partials of query block `task` = (b, h, qb).
  void run_queries(int64_t task, scalar_t* dq_all, Partials<acc_t>& part) {
    const int64_t n_qb = ceil_div(s_.Tq, kBlockQ);
    const int64_t qb = task % n_qb, h = (task / n_qb) % s_.H, b = task / (n_qb * s_.H);
    const int64_t hk = h / s_.G, i0 = qb * kBlockQ;
    const int64_t lq = in_.lq[b], lk = in_.lk[b];
    const int64_t rows = std::min(kBlockQ, s_.Tq - i0);
    int64_t nq = std::clamp<int64_t>(lq - i0, 0, rows);
    const int64_t kend = in_.causal ? std::min(lk, i0 + nq + lk - lq) : lk;
    if (kend <= 0) nq = 0;  // rows with no allowed key pass no gradient
    const int64_t base = (b * s_.H + h) * s_.Tq + i0;
    write_zero_rows(base, nq, rows, dq_all, part, kQKinds);
    if (nq == 0) return;

    const int64_t M = round_up(nq, kRows);
    load_query_tile(b, h, i0, nq, M);
    prepare_keys(b, hk, lk);
    if (kExactDelta) exact_deltas(b, h, i0, nq, M, kend, lq, lk);
    const QueryRows<acc_t> qr{q_.data(), do_.data(), lse_tile_.data(), delta_tile_.data()};
    acc_t* dq_acc = acc_.data();
    std::fill(acc_.begin(), acc_.begin() + M * s_.Dp, acc_t(0));
    std::fill(rows_.begin(), rows_.end(), BiasRowGrads<acc_t>{});
    for (int64_t j0 = 0; j0 < kend; j0 += kBlockK) {
      const int64_t nk = std::min(kBlockK, kend - j0), N = round_up(nk, kPad);
      const KeyTile<acc_t> kt = key_tile(j0);
      probs_and_grads(b, h, i0, nq, M, qr, j0, nk, N, kt, lq, lk, nullptr, rows_.data());
      gemm<acc_t>(M, s_.Dp, nk, ds_.data(), kBlockK, kt.k, s_.Dp, dq_acc, s_.Dp, true);
    }
    const acc_t scale = static_cast<acc_t>(in_.scale), a = alpha_[h];
    for (int64_t r = 0; r < nq; ++r) {
      const int64_t i = i0 + r, t = sq_.token(b, i), slot = base + r;
      unrotate_row(dq_acc + r * s_.Dp, scale, in_.q.data_ptr<scalar_t>() + slot * s_.D, sq_.cos + sq_.pair(b, i),
                   sq_.sin + sq_.pair(b, i), sq_.phi + sq_.pair(b, i), sq_.radius[t], s_.P, dq_all + slot * s_.D,
                   part.kind(kQRadius)[slot], part.kind(kQLogTheta)[slot]);
      const BiasRowGrads<acc_t>& g = rows_[r];  // all zero without a bias
      part.kind(kQPitch)[slot] = -beta_ * a * g.w_sign;
      part.kind(kQAlpha)[slot] = in_.bias == kBiasExp ? g.w : -beta_ * g.w_dist;
      part.kind(kQBeta)[slot] = -a * g.w_dist;
    }
  }

  // Pass 2: dK, dV and key-side partials of key block `task` = (b, hk, kb).
  void run_keys(int64_t task, scalar_t* dk_all, scalar_t* dv_all, Partials<acc_t>& part) {
    const int64_t kb = task % n_kb_, hk = (task / n_kb_) % s_.Hk, b = task / (n_kb_ * s_.Hk);
    const int64_t j0 = kb * kBlockK;
    const int64_t lq = in_.lq[b], lk = in_.lk[b];
    const int64_t rows = std::min(kBlockK, s_.Tk - j0);
    const int64_t nk = std::clamp<int64_t>(lk - j0, 0, rows);
    const int64_t base = (b * s_.Hk + hk) * s_.Tk + j0;
    write_zero_rows(base, nk, rows, dk_all, part, kKKinds);  // keys past Lk get zero gradients
    for (int64_t c = nk; c < rows; ++c) std::fill_n(dv_all + (base + c) * s_.D, s_.D, scalar_t(0));
    if (nk == 0) return;

    const int64_t N = round_up(nk, kPad), Mk = round_up(nk, kRows);
    prepare_keys(b, hk, lk);
    prepare_queries(b, hk, lq);
    const KeyTile<acc_t> kt = key_tile(j0);
    acc_t* dk_acc = acc_.data();
    acc_t* dv_acc = acc2_.data();
    std::fill(acc_.begin(), acc_.end(), acc_t(0));
    std::fill(acc2_.begin(), acc2_.end(), acc_t(0));
    std::fill(dpitch_.begin(), dpitch_.end(), acc_t(0));
    // Query rows before istart are above the causal diagonal for every key of the block.
    const int64_t istart = in_.causal ? std::max<int64_t>(0, j0 - (lk - lq)) : 0;
    for (int64_t g = 0; g < s_.G; ++g) {
      const int64_t h = hk * s_.G + g;
      std::fill(col_.begin(), col_.end(), acc_t(0));
      for (int64_t i0 = istart; i0 < lq; i0 += kBlockQ) {
        const int64_t nq = std::min(kBlockQ, lq - i0), M = round_up(nq, kRows);
        const int64_t row0 = g * tq_rows_ + i0;
        const QueryRows<acc_t> qr{qc_.data() + row0 * s_.Dp, doc_.data() + row0 * s_.Dp, lsec_.data() + row0,
                                  deltac_.data() + row0};
        probs_and_grads(b, h, i0, nq, M, qr, j0, nk, N, kt, lq, lk, col_.data(), nullptr);
        gemm_at<acc_t>(Mk, s_.Dp, nq, p_.data(), kBlockK, qr.dout, s_.Dp, dv_acc, s_.Dp, true);
        gemm_at<acc_t>(Mk, s_.Dp, nq, ds_.data(), kBlockK, qr.q, s_.Dp, dk_acc, s_.Dp, true);
      }
      // dpitch_k = sum over heads and queries of beta * alpha_h * w * sign(pq - pk).
      if (in_.bias != kBiasNone)
        for (int64_t c = 0; c < nk; ++c) dpitch_[c] += beta_ * alpha_[h] * col_[c];
    }
    for (int64_t c = 0; c < nk; ++c) {
      const int64_t t = sk_.token(b, j0 + c), slot = base + c;
      unrotate_row(dk_acc + c * s_.Dp, acc_t(1), in_.k.data_ptr<scalar_t>() + slot * s_.D, sk_.cos + sk_.pair(b, j0 + c),
                   sk_.sin + sk_.pair(b, j0 + c), sk_.phi + sk_.pair(b, j0 + c), sk_.radius[t], s_.P,
                   dk_all + slot * s_.D, part.kind(kKRadius)[slot], part.kind(kKLogTheta)[slot]);
      part.kind(kKPitch)[slot] = dpitch_[c];
      for (int64_t d = 0; d < s_.D; ++d) dv_all[slot * s_.D + d] = static_cast<scalar_t>(dv_acc[c * s_.Dp + d]);
    }
  }

 private:
  // With bfloat16/float16 outputs, delta = <dout, out> would inherit out's rounding (a
  // coherent error in every dS, visible in dbeta). Instead sum_j P_ij dP_ij over all key
  // tiles in the stat dtype (two extra tile gemms); the keys pass then reads these deltas.
  static constexpr bool kExactDelta = !std::is_same<scalar_t, acc_t>::value;

  // Rows [from, rows) of a block get zero gradients (the kernels write every element, so
  // the outputs need no zero fill and poisoned buffers catch a forgotten one).
  void write_zero_rows(int64_t base, int64_t from, int64_t rows, scalar_t* grad, Partials<acc_t>& part,
                       int64_t kinds) {
    for (int64_t r = from; r < rows; ++r) {
      std::fill_n(grad + (base + r) * s_.D, s_.D, scalar_t(0));
      for (int64_t n = 0; n < kinds; ++n) part.kind(n)[base + r] = acc_t(0);
    }
  }

  void exact_deltas(int64_t b, int64_t h, int64_t i0, int64_t nq, int64_t M, int64_t kend, int64_t lq,
                    int64_t lk) {
    std::fill(delta_tile_.begin(), delta_tile_.end(), acc_t(0));
    for (int64_t j0 = 0; j0 < kend; j0 += kBlockK) {
      const int64_t nk = std::min(kBlockK, kend - j0), N = round_up(nk, kPad);
      const KeyTile<acc_t> kt = key_tile(j0);
      gemm<acc_t>(M, N, s_.Dp, q_.data(), s_.Dp, kt.kt, kBlockK, p_.data(), kBlockK, false);
      gemm<acc_t>(M, N, s_.Dp, do_.data(), s_.Dp, kt.vt, kBlockK, ds_.data(), kBlockK, false);
      for (int64_t r = 0; r < nq; ++r) {
        const int64_t i = i0 + r;
        acc_t* prow = p_.data() + r * kBlockK;
        const BiasRow<acc_t> br = bias_row(b, h, i);
        if (br.active() && kt.any_voiced) add_bias_row(br, kt.pitch, kt.voiced, N, prow, static_cast<acc_t*>(nullptr));
        mask_row(prow, key_limit(i, j0, nk, lq, lk, in_.causal), N);
        exp_row(prow, N, lse_tile_[r]);
        delta_tile_[r] += dot_row(prow, ds_.data() + r * kBlockK, N);
      }
    }
    const int64_t base = (b * s_.H + h) * s_.Tq + i0;
    for (int64_t r = 0; r < nq; ++r) delta_[base + r] = delta_tile_[r];
  }

  BiasRow<acc_t> bias_row(int64_t b, int64_t h, int64_t i) const {
    const int64_t t = sq_.token(b, i);
    return BiasRow<acc_t>{in_.bias, alpha_[h], beta_, sq_.pitch[t], sq_.voiced[t]};
  }

  // exp(s - (+inf)) = 0 keeps rows without an allowed key (lse = -inf) out of every gradient.
  acc_t safe_lse(int64_t slot) const {
    return std::isinf(lse_[slot]) ? std::numeric_limits<acc_t>::infinity() : lse_[slot];
  }

  // The queries pass's own tile: rotated, scaled queries q_ [M, Dp], dout rows do_ [M, Dp],
  // safe lse and delta per row; rows nq..M-1 zero.
  void load_query_tile(int64_t b, int64_t h, int64_t i0, int64_t nq, int64_t M) {
    q_.resize(kBlockQ * s_.Dp);
    do_.resize(kBlockQ * s_.Dp);
    lse_tile_.resize(kBlockQ);
    delta_tile_.resize(kBlockQ);
    const int64_t base = (b * s_.H + h) * s_.Tq + i0;
    const scalar_t* q = in_.q.data_ptr<scalar_t>() + base * s_.D;
    const acc_t scale = static_cast<acc_t>(in_.scale);
    for (int64_t r = 0; r < nq; ++r) {
      const int64_t t = sq_.token(b, i0 + r);
      rotate_row(q + r * s_.D, sq_.cos + sq_.pair(b, i0 + r), sq_.sin + sq_.pair(b, i0 + r), sq_.radius[t], scale,
                 s_.P, q_.data() + r * s_.Dp, 1);
      load_row(dout_ + (base + r) * s_.D, s_.D, do_.data() + r * s_.Dp, 1);
      lse_tile_[r] = safe_lse(base + r);
      delta_tile_[r] = delta_[base + r];
    }
    std::fill(q_.begin() + nq * s_.Dp, q_.begin() + M * s_.Dp, acc_t(0));
    std::fill(do_.begin() + nq * s_.Dp, do_.begin() + M * s_.Dp, acc_t(0));
  }

  // Rotated keys of the whole (b, hk) sequence, row-major [Tk, Dp] and transposed per key
  // tile [Dp, kBlockK]; values transposed per tile; key pitch / voicing. Once per thread
  // and (b, hk).
  void prepare_keys(int64_t b, int64_t hk, int64_t lk) {
    const int64_t key = b * s_.Hk + hk;
    if (key == keys_of_) return;
    keys_of_ = key;
    const int64_t tk_pad = n_kb_ * kBlockK;
    if (kc_.empty()) {
      kc_.assign(tk_pad * s_.Dp, acc_t(0));
      ktc_.assign(tk_pad * s_.Dp, acc_t(0));
      vtc_.assign(tk_pad * s_.Dp, acc_t(0));
      pkc_.assign(tk_pad, acc_t(0));
      vkc_.assign(tk_pad, acc_t(0));
      tile_voiced_.assign(n_kb_, 0);
    }
    const int64_t base = key * s_.Tk * s_.D;
    const scalar_t* k = in_.k.data_ptr<scalar_t>() + base;
    const scalar_t* v = in_.v.data_ptr<scalar_t>() + base;
    for (int64_t j = 0; j < lk; ++j) {
      const int64_t t = sk_.token(b, j), kb = j / kBlockK, c = j % kBlockK;
      acc_t* krow = kc_.data() + j * s_.Dp;
      rotate_row(k + j * s_.D, sk_.cos + sk_.pair(b, j), sk_.sin + sk_.pair(b, j), sk_.radius[t], acc_t(1), s_.P,
                 krow, 1);
      acc_t* kt = ktc_.data() + kb * s_.Dp * kBlockK + c;
      for (int64_t d = 0; d < s_.D; ++d) kt[d * kBlockK] = krow[d];
      load_row(v + j * s_.D, s_.D, vtc_.data() + kb * s_.Dp * kBlockK + c, kBlockK);
      pkc_[j] = sk_.pitch[t];
      vkc_[j] = sk_.voiced[t];
    }
    // Keys past Lk: finite zeros (they are masked, but their products must not be NaN).
    std::fill(pkc_.begin() + lk, pkc_.end(), acc_t(0));
    std::fill(vkc_.begin() + lk, vkc_.end(), acc_t(0));
    for (int64_t kb = 0; kb < n_kb_; ++kb) {
      const auto first = vkc_.begin() + kb * kBlockK;
      tile_voiced_[kb] = std::any_of(first, first + kBlockK, [](acc_t x) { return x != acc_t(0); });
    }
  }

  KeyTile<acc_t> key_tile(int64_t j0) const {
    const int64_t kb = j0 / kBlockK;
    return KeyTile<acc_t>{ktc_.data() + kb * s_.Dp * kBlockK, vtc_.data() + kb * s_.Dp * kBlockK,
                          kc_.data() + j0 * s_.Dp,         pkc_.data() + j0,
                          vkc_.data() + j0,                tile_voiced_[kb] != 0};
  }

  // The keys pass reads every query tile of the group's heads for each key block: rotated,
  // scaled queries, dout, safe lse and delta of all G heads of (b, hk), once per thread and
  // (b, hk). Rows past Lq are zero (they pad the register tile).
  void prepare_queries(int64_t b, int64_t hk, int64_t lq) {
    const int64_t key = b * s_.Hk + hk;
    if (key == queries_of_) return;
    queries_of_ = key;
    tq_rows_ = round_up(s_.Tq, kBlockQ) + kRows;
    const int64_t rows = s_.G * tq_rows_;
    qc_.resize(rows * s_.Dp);
    doc_.resize(rows * s_.Dp);
    lsec_.resize(rows);
    deltac_.resize(rows);
    const acc_t scale = static_cast<acc_t>(in_.scale);
    for (int64_t g = 0; g < s_.G; ++g) {
      const int64_t h = hk * s_.G + g, base = (b * s_.H + h) * s_.Tq, row0 = g * tq_rows_;
      const scalar_t* q = in_.q.data_ptr<scalar_t>() + base * s_.D;
      for (int64_t i = 0; i < lq; ++i) {
        const int64_t t = sq_.token(b, i);
        rotate_row(q + i * s_.D, sq_.cos + sq_.pair(b, i), sq_.sin + sq_.pair(b, i), sq_.radius[t], scale, s_.P,
                   qc_.data() + (row0 + i) * s_.Dp, 1);
        load_row(dout_ + (base + i) * s_.D, s_.D, doc_.data() + (row0 + i) * s_.Dp, 1);
        lsec_[row0 + i] = safe_lse(base + i);
        deltac_[row0 + i] = delta_[base + i];
      }
      std::fill(qc_.begin() + (row0 + lq) * s_.Dp, qc_.begin() + (row0 + tq_rows_) * s_.Dp, acc_t(0));
      std::fill(doc_.begin() + (row0 + lq) * s_.Dp, doc_.begin() + (row0 + tq_rows_) * s_.Dp, acc_t(0));
      std::fill(lsec_.begin() + row0 + lq, lsec_.begin() + row0 + tq_rows_, std::numeric_limits<acc_t>::infinity());
      std::fill(deltac_.begin() + row0 + lq, deltac_.begin() + row0 + tq_rows_, acc_t(0));
    }
  }

  // Recomputes P (p_) and dS = P (dP - delta) (ds_) of query rows [i0, i0 + nq) against
  // keys [j0, j0 + nk); rows nq..M-1 become 0. Bias gradient pieces go to `col` (per key)
  // and/or `rows` (per query row).
  void probs_and_grads(int64_t b, int64_t h, int64_t i0, int64_t nq, int64_t M, const QueryRows<acc_t>& qr,
                       int64_t j0, int64_t nk, int64_t N, const KeyTile<acc_t>& kt, int64_t lq, int64_t lk,
                       acc_t* col, BiasRowGrads<acc_t>* rows) {
    gemm<acc_t>(M, N, s_.Dp, qr.q, s_.Dp, kt.kt, kBlockK, p_.data(), kBlockK, false);
    gemm<acc_t>(M, N, s_.Dp, qr.dout, s_.Dp, kt.vt, kBlockK, ds_.data(), kBlockK, false);
    for (int64_t r = 0; r < nq; ++r) {
      const int64_t i = i0 + r;
      acc_t* prow = p_.data() + r * kBlockK;
      acc_t* dsrow = ds_.data() + r * kBlockK;
      acc_t* erow = e_.data() + r * kBlockK;
      const BiasRow<acc_t> br = bias_row(b, h, i);
      // With no voiced key in the tile the bias and its gradients are exactly 0 there.
      const bool biased = br.active() && kt.any_voiced;
      if (biased) add_bias_row(br, kt.pitch, kt.voiced, N, prow, erow);
      mask_row(prow, key_limit(i, j0, nk, lq, lk, in_.causal), N);
      exp_row(prow, N, qr.lse[r]);
      softmax_grad_row(prow, dsrow, N, qr.delta[r]);
      if (biased) {
        const BiasRowGrads<acc_t> g = bias_row_grads(br, dsrow, erow, kt.pitch, kt.voiced, N, col);
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
  const int64_t n_kb_;
  // Tile work buffers.
  std::vector<acc_t> p_, ds_, e_, acc_, acc2_, col_, dpitch_;
  std::vector<BiasRowGrads<acc_t>> rows_;
  // Queries pass: its own query tile (allocated on first use).
  std::vector<acc_t> q_, do_, lse_tile_, delta_tile_;
  // Key cache of (b, hk) = keys_of_ (allocated on first use).
  std::vector<acc_t> kc_, ktc_, vtc_, pkc_, vkc_;
  std::vector<char> tile_voiced_;
  int64_t keys_of_ = -1;
  // Query cache of (b, hk) = queries_of_, G heads of tq_rows_ rows each (keys pass only).
  std::vector<acc_t> qc_, doc_, lsec_, deltac_;
  int64_t queries_of_ = -1, tq_rows_ = 0;
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

  // The kernels write every element of these (zeros included).
  at::Tensor dq = new_output(q.sizes(), q.options(), in.poison);
  at::Tensor dk = new_output(k.sizes(), k.options(), in.poison);
  at::Tensor dv = new_output(v.sizes(), v.options(), in.poison);
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
    Partials<acc_t> qpart{new_output({kQKinds, s.B, s.H, s.Tq}, stat_opts, in.poison), s.B * s.H * s.Tq};
    Partials<acc_t> kpart{new_output({kKKinds, s.B, s.Hk, s.Tk}, stat_opts, in.poison), s.B * s.Hk * s.Tk};

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
