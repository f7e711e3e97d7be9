// Fused vRoPE attention backward on CPU, deterministic without atomics.
//
// One pass over key blocks recomputes P = exp(S - lse) tile by tile (as FlashAttention-2
// does) and forms all three matrix gradients from the same dS: per (batch, kv head, key
// chunk) task, each key block walks the group's query tiles and accumulates
//   dV += P^T dO and dK~ += dS^T Q~ in the task's own block buffers, and
//   dQ~ += dS K~ (unscaled) into the chunk's own [Tq, D] slice of a partial buffer;
// five tile products per (query tile, key tile), where separate query and key passes need
// seven (S and dP twice). Key-side partials (radius, log-theta, pitch) are finished per key
// block; a last pass over query rows sums the dQ~ slices and the per-row bias pieces over
// chunks in a fixed order, unrotates dQ~ and writes the query-side partials.
//
// Chunks, not one task per (batch, kv head), keep enough tasks for the threads when B x Hk
// is small; their number depends only on the shapes (never on the thread count), and every
// partial lands in its own slot and is summed in a fixed order, so the result is bitwise the
// same for any number of threads (the chunk count does depend on B, like the tile sums of
// any batched kernel). bfloat16/float16 inputs first take a query-tile pass that computes
// the row deltas exactly (see kExactDelta).
//
// Each thread keeps its current (batch, kv head)'s rotated keys and queries prepared once
// (consecutive tasks share them); the caches are pure functions of (b, kv head), so which
// thread fills them never changes a bit. Extra memory: per thread keys 3 x Tk x D and
// queries 2 x (H / Hk) x Tq x D; the chunk slices, chunks x B x H x (Tq + 4) x (D + 3) in
// the stat dtype, with ceil(kMinTasks / (B x Hk)) chunks at most and as many as fit in
// kChunkBytes (at least one): O(T), never [Tq, Tk].
#include "vrope_common.h"

#include <type_traits>

namespace vrope {
namespace {

// Enough tasks for the threads of a large CPU when B x Hk is small...
constexpr int64_t kMinTasks = 32;
// ...as long as the chunk slices stay within this many bytes (a long sequence with few
// heads trades parallelism for memory).
constexpr int64_t kChunkBytes = int64_t(256) << 20;

// Key blocks [first(c), first(c + 1)) form chunk c.
struct KeyChunks {
  int64_t blocks, count;
  KeyChunks(const Shape& s, int64_t stat_bytes) : blocks(ceil_div(s.Tk, kBlockK)) {
    const int64_t tasks = std::max<int64_t>(s.B * s.Hk, 1);
    const int64_t slice_bytes = std::max<int64_t>(s.B * s.H * (s.Tq + kRows) * (s.Dp + 3) * stat_bytes, 1);
    const int64_t most = std::max<int64_t>(std::min(blocks, kChunkBytes / slice_bytes), 1);
    count = std::clamp<int64_t>(ceil_div(kMinTasks, tasks), 1, most);
  }
  int64_t first(int64_t c) const { return c * blocks / count; }
};

// Query-side sums of one key chunk: dQ~ rows (dS K~, rotated layout, before the softmax scale)
// [chunks, B, H, Tq + kRows, Dp] (kRows spare rows take the padded rows of a register
// tile) and the per-row bias pieces [chunks, B, H, Tq]. A chunk's first key block writes
// its dQ~ rows and later blocks add to them, so the slices need no zero fill: rows a chunk
// never meets stay unwritten and the last pass skips them (see first_written_row). The
// kRows rows from Lq on, never read, are zeroed up front so that the register-tile padding
// that blocks add there stays defined.
template <typename acc_t>
struct ChunkSums {
  at::Tensor dq_buf;
  std::vector<BiasRowGrads<acc_t>> bias;
  int64_t rows_per_head, Dp;
  acc_t* dq_data;  // dq_buf's data, read once (data_ptr checks the dtype on every call)
  ChunkSums(at::Tensor buf, int64_t n_bias, int64_t rows, int64_t dp)
      : dq_buf(std::move(buf)), bias(n_bias), rows_per_head(rows), Dp(dp), dq_data(dq_buf.data_ptr<acc_t>()) {}
  int64_t head(int64_t c, int64_t b, int64_t h, const Shape& s) const { return (c * s.B + b) * s.H + h; }
  acc_t* dq(int64_t c, int64_t b, int64_t h, int64_t i, const Shape& s) {
    return dq_data + (head(c, b, h, s) * rows_per_head + i) * Dp;
  }
  BiasRowGrads<acc_t>* row_bias(int64_t c, int64_t b, int64_t h, int64_t i, const Shape& s) {
    return bias.data() + head(c, b, h, s) * s.Tq + i;
  }
};

template <typename acc_t>
struct Partials {
  at::Tensor buf;  // [kinds, B, heads, T]
  int64_t stride;  // elements per kind
  acc_t* data;     // buf's data, read once
  Partials(at::Tensor b, int64_t s) : buf(std::move(b)), stride(s), data(buf.data_ptr<acc_t>()) {}
  acc_t* kind(int64_t n) { return data + n * stride; }
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
  KeyPitch<acc_t> bias_keys;  // the pitch-bias inputs of the tile's keys
  bool any_voiced;            // some key of the tile is voiced (else the pitch bias is 0 on the whole tile)
};

template <typename scalar_t, typename acc_t>
class BackwardTask {
 public:
  BackwardTask(const Inputs& in, const Side<acc_t>& sq, const Side<acc_t>& sk, const scalar_t* dout,
               const acc_t* lse, const acc_t* delta)
      : in_(in), s_(in.shape), sq_(sq), sk_(sk), dout_(dout), lse_(lse), delta_(delta),
        n_kb_(ceil_div(s_.Tk, kBlockK)), turned_(scores_turn_query<acc_t>(s_)), p_(kBlockQ * kBlockK, acc_t(0)),
        ds_(kBlockQ * kBlockK, acc_t(0)),
        dk_acc_(kBlockK * s_.Dp, acc_t(0)), dv_acc_(kBlockK * s_.Dp, acc_t(0)),
        col_(kBlockK, acc_t(0)), dpitch_(kBlockK, acc_t(0)), delta_tile_(kBlockQ, acc_t(0)), dq_row_(s_.Dp, acc_t(0)),
        qa_(turned_ ? 2 * s_.P : 0), qb_(turned_ ? 2 * s_.P : 0), keys_(s_.Tk, sk.up != nullptr),
        q_(in.q.data_ptr<scalar_t>()), k_(in.k.data_ptr<scalar_t>()),
        v_(in.v.data_ptr<scalar_t>()), alpha_(in.alpha.data_ptr<acc_t>()),
        beta_(static_cast<acc_t>(in.beta_value)) {}

  // Main pass, task = (b, hk, chunk): every key block of the chunk (dK, dV, key-side
  // partials) and the chunk's dQ~ and bias-row sums.
  void run_keys(int64_t task, const KeyChunks& chunks, scalar_t* dk_all, scalar_t* dv_all, Partials<acc_t>& part,
                ChunkSums<acc_t>& sums) {
    const int64_t c = task % chunks.count, hk = (task / chunks.count) % s_.Hk, b = task / (chunks.count * s_.Hk);
    for (int64_t kb = chunks.first(c); kb < chunks.first(c + 1); ++kb)
      key_block(b, hk, c, kb, kb == chunks.first(c), dk_all, dv_all, part, sums);
  }

  // Last pass, task = (b, h, query block): dq and the query-side partials from the chunk sums.
  void finish_queries(int64_t task, const KeyChunks& chunks, scalar_t* dq_all, Partials<acc_t>& part,
                      ChunkSums<acc_t>& sums) {
    const int64_t n_qb = ceil_div(s_.Tq, kBlockQ);
    const int64_t qb = task % n_qb, h = (task / n_qb) % s_.H, b = task / (n_qb * s_.H), i0 = qb * kBlockQ;
    const int64_t lq = in_.lq[b], lk = in_.lk[b];
    const int64_t rows = std::min(kBlockQ, s_.Tq - i0);
    const int64_t nq = std::clamp<int64_t>(lq - i0, 0, rows);
    const int64_t base = (b * s_.H + h) * s_.Tq + i0;
    write_zero_rows(base, nq, rows, dq_all, part, kQKinds);
    const acc_t scale = static_cast<acc_t>(in_.scale), a = alpha_[h];
    acc_t* g = dq_row_.data();
    for (int64_t r = 0; r < nq; ++r) {
      const int64_t i = i0 + r, t = sq_.token(b, i), slot = base + r;
      if (!sees_keys(i, lq, lk)) {  // no allowed key: no gradient (never 0 * a padded token's radius)
        write_zero_rows(base, r, r + 1, dq_all, part, kQKinds);
        continue;
      }
      std::fill_n(g, s_.Dp, acc_t(0));
      BiasRowGrads<acc_t> bg;
      for (int64_t ch = 0; ch < chunks.count; ++ch) {
        if (i < first_written_row(chunks.first(ch) * kBlockK, lq, lk)) continue;
        const acc_t* src = sums.dq(ch, b, h, i, s_);
        for (int64_t d = 0; d < s_.Dp; ++d) g[d] += src[d];
        bg += *sums.row_bias(ch, b, h, i, s_);
      }
      unrotate_row(g, scale, q_ + slot * s_.D, sq_.cos + sq_.pair(b, i),
                   sq_.sin + sq_.pair(b, i), sq_.phi + sq_.pair(b, i), sq_.radius[t], s_.P, dq_all + slot * s_.D,
                   part.kind(kQRadius)[slot], part.kind(kQLogTheta)[slot]);
      part.kind(kQPitch)[slot] = -beta_ * a * bg.w_sign;  // all bias pieces are zero without a bias
      part.kind(kQAlpha)[slot] = in_.bias == kBiasExp ? bg.w : -beta_ * bg.w_dist;
      part.kind(kQBeta)[slot] = -a * bg.w_dist;
    }
  }

  // With bfloat16/float16 outputs, delta = <dout, out> would inherit out's rounding (a
  // coherent error in every dS, visible in dbeta). Instead, before the main pass, sum_j
  // P_ij dP_ij over all key tiles in the stat dtype (two extra tile products).
  static constexpr bool kExactDelta = !std::is_same<scalar_t, acc_t>::value;

  // Delta pass, task = (b, h, query block): exact row deltas into `exact` (the main pass
  // reads them as its delta; this pass's query caches read the inexact ones, unused).
  void run_deltas(int64_t task, acc_t* exact) {
    const int64_t n_qb = ceil_div(s_.Tq, kBlockQ);
    const int64_t qb = task % n_qb, h = (task / n_qb) % s_.H, b = task / (n_qb * s_.H), i0 = qb * kBlockQ;
    const int64_t hk = h / s_.G, lq = in_.lq[b], lk = in_.lk[b];
    const int64_t nq = std::clamp<int64_t>(lq - i0, 0, std::min(kBlockQ, s_.Tq - i0));
    const int64_t kend = in_.causal ? std::min(lk, i0 + nq + lk - lq) : lk;
    if (nq == 0 || kend <= 0) return;  // these rows pass no gradient, their delta is never used
    prepare_keys(b, hk, lk);
    prepare_queries(b, hk, lq);
    const int64_t M = round_up(nq, kRows);
    const QueryRows<acc_t> qr = query_rows(h % s_.G, i0);
    std::fill(delta_tile_.begin(), delta_tile_.end(), acc_t(0));
    for (int64_t j0 = 0; j0 < kend; j0 += kBlockK) {
      const int64_t nk = std::min(kBlockK, kend - j0), N = round_up(nk, kPad);
      const KeyTile<acc_t> kt = key_tile(j0);
      score_tiles(M, N, qr, kt, b, hk, j0, nk);
      for (int64_t r = 0; r < nq; ++r) {
        probs_row(bias_row(b, h, i0 + r), i0 + r, r, j0, nk, N, kt, qr.lse[r], lq, lk);
        delta_tile_[r] += dot_row(p_.data() + r * kBlockK, ds_.data() + r * kBlockK, N);
      }
    }
    const int64_t base = (b * s_.H + h) * s_.Tq + i0;
    for (int64_t r = 0; r < nq; ++r) exact[base + r] = delta_tile_[r];
  }

 private:
  // Key block kb of (b, hk): dK, dV and the key-side partials, written; dQ~ of every query
  // row it meets, written into chunk c's sums by the chunk's first block and added by the
  // others, and the bias-row pieces, added.
  void key_block(int64_t b, int64_t hk, int64_t c, int64_t kb, bool first_in_chunk, scalar_t* dk_all,
                 scalar_t* dv_all, Partials<acc_t>& part, ChunkSums<acc_t>& sums) {
    const int64_t j0 = kb * kBlockK;
    const int64_t lq = in_.lq[b], lk = in_.lk[b];
    const int64_t rows = std::min(kBlockK, s_.Tk - j0);
    const int64_t nk = std::clamp<int64_t>(lk - j0, 0, rows);
    const int64_t base = (b * s_.Hk + hk) * s_.Tk + j0;
    write_zero_rows(base, nk, rows, dk_all, part, kKKinds);  // keys past Lk get zero gradients
    for (int64_t r = nk; r < rows; ++r) std::fill_n(dv_all + (base + r) * s_.D, s_.D, scalar_t(0));
    if (nk == 0) return;

    const int64_t N = round_up(nk, kPad), Mk = round_up(nk, kRows);
    prepare_keys(b, hk, lk);
    prepare_queries(b, hk, lq);
    const KeyTile<acc_t> kt = key_tile(j0);
    std::fill(dk_acc_.begin(), dk_acc_.end(), acc_t(0));
    std::fill(dv_acc_.begin(), dv_acc_.end(), acc_t(0));
    std::fill(dpitch_.begin(), dpitch_.end(), acc_t(0));
    const int64_t istart = first_query(j0, lq, lk);
    for (int64_t g = 0; g < s_.G; ++g) {
      const int64_t h = hk * s_.G + g;
      std::fill(col_.begin(), col_.end(), acc_t(0));
      for (int64_t i0 = istart; i0 < lq; i0 += kBlockQ) {
        const int64_t nq = std::min(kBlockQ, lq - i0), M = round_up(nq, kRows);
        const QueryRows<acc_t> qr = query_rows(g, i0);
        probs_and_grads(b, h, i0, nq, M, qr, j0, nk, N, kt, lq, lk, col_.data(), sums.row_bias(c, b, h, i0, s_));
        gemm_at<acc_t>(Mk, s_.Dp, nq, p_.data(), kBlockK, qr.dout, s_.Dp, dv_acc_.data(), s_.Dp, true);
        gemm_at<acc_t>(Mk, s_.Dp, nq, ds_.data(), kBlockK, qr.q, s_.Dp, dk_acc_.data(), s_.Dp, true);
        gemm<acc_t>(M, s_.Dp, nk, ds_.data(), kBlockK, kt.k, s_.Dp, sums.dq(c, b, h, i0, s_), s_.Dp,
                    !first_in_chunk);
      }
      // dpitch_k = sum over heads and queries of beta * alpha_h * w * sign(pq - pk).
      if (in_.bias != kBiasNone)
        for (int64_t r = 0; r < nk; ++r) dpitch_[r] += beta_ * alpha_[h] * col_[r];
    }
    for (int64_t r = 0; r < nk; ++r) {
      const int64_t j = j0 + r, t = sk_.token(b, j), slot = base + r;
      unrotate_row(dk_acc_.data() + r * s_.Dp, acc_t(1), k_ + slot * s_.D,
                   sk_.cos + sk_.pair(b, j), sk_.sin + sk_.pair(b, j), sk_.phi + sk_.pair(b, j), sk_.radius[t], s_.P,
                   dk_all + slot * s_.D, part.kind(kKRadius)[slot], part.kind(kKLogTheta)[slot]);
      part.kind(kKPitch)[slot] = dpitch_[r];
      for (int64_t d = 0; d < s_.D; ++d) dv_all[slot * s_.D + d] = static_cast<scalar_t>(dv_acc_[r * s_.Dp + d]);
    }
  }

  // Query rows before this one are above the causal diagonal for every key from j0 on.
  int64_t first_query(int64_t j0, int64_t lq, int64_t lk) const {
    return in_.causal ? std::max<int64_t>(0, j0 - (lk - lq)) : 0;
  }

  // The first query row that the key block starting at j0 writes into its chunk's dQ~ slice,
  // when it is the chunk's first block: rows before it (and all rows, when the block's keys
  // all lie past Lk) are never written, as later blocks of the chunk meet no earlier rows.
  int64_t first_written_row(int64_t j0, int64_t lq, int64_t lk) const {
    return j0 < lk ? first_query(j0, lq, lk) : lq;
  }

  // Query i has an allowed key: j < Lk and (causal) j <= i + Lk - Lq for some j >= 0.
  bool sees_keys(int64_t i, int64_t lq, int64_t lk) const { return lk > 0 && (!in_.causal || i + lk - lq >= 0); }

  // Rows [from, rows) of a block get zero gradients (the kernels write every element, so
  // the outputs need no zero fill and poisoned buffers catch a forgotten one).
  void write_zero_rows(int64_t base, int64_t from, int64_t rows, scalar_t* grad, Partials<acc_t>& part,
                       int64_t kinds) {
    for (int64_t r = from; r < rows; ++r) {
      std::fill_n(grad + (base + r) * s_.D, s_.D, scalar_t(0));
      for (int64_t n = 0; n < kinds; ++n) part.kind(n)[base + r] = acc_t(0);
    }
  }

  BiasRow<acc_t> bias_row(int64_t b, int64_t h, int64_t i) const {
    return make_bias_row(in_.bias, alpha_[h], beta_, sq_, sq_.token(b, i));
  }

  // exp(s - (+inf)) = 0 keeps rows without an allowed key (lse = -inf) out of every gradient.
  acc_t safe_lse(int64_t slot) const {
    return std::isinf(lse_[slot]) ? std::numeric_limits<acc_t>::infinity() : lse_[slot];
  }

  // Rotated keys of the whole (b, hk) sequence, row-major [Tk, Dp] and transposed per key
  // tile [Dp, kBlockK]; values transposed per tile; the keys' bias inputs. Once per thread
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
    }
    const scalar_t* k = kv_rows(k_, s_, b, hk, 0);
    const scalar_t* v = kv_rows(v_, s_, b, hk, 0);
    for (int64_t j = 0; j < lk; ++j) {
      const int64_t t = sk_.token(b, j), kb = j / kBlockK, c = j % kBlockK;
      acc_t* krow = kc_.data() + j * s_.Dp;
      rotate_row(k + j * s_.D, sk_.cos + sk_.pair(b, j), sk_.sin + sk_.pair(b, j), sk_.radius[t], acc_t(1), s_.P,
                 krow, 1);
      acc_t* kt = ktc_.data() + kb * s_.Dp * kBlockK + c;
      for (int64_t d = 0; d < s_.D; ++d) kt[d * kBlockK] = krow[d];
      load_row(v + j * s_.D, s_.D, vtc_.data() + kb * s_.Dp * kBlockK + c, kBlockK);
    }
    keys_.load(sk_, b, lk);
  }

  KeyTile<acc_t> key_tile(int64_t j0) const {
    const int64_t kb = j0 / kBlockK;
    return KeyTile<acc_t>{ktc_.data() + kb * s_.Dp * kBlockK, vtc_.data() + kb * s_.Dp * kBlockK,
                          kc_.data() + j0 * s_.Dp, keys_.tile(j0), keys_.tile_voiced(j0)};
  }

  // Every key block reads every query tile of the group's heads: rotated,
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
      const scalar_t* q = q_ + base * s_.D;
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
    if (turned_) interleave_query(qc_.data(), s_.P, qa_.data(), qb_.data());
  }

  // Score tiles of M query rows against key tile kt (keys [j0, j0 + nk) of (b, hk), N columns):
  // S = Q~ K~^T into p_ and dP = dO V^T into ds_. A lone query row gets the forward's scores
  // bit for bit, from its turned copies (rows past it and columns past nk are never read).
  void score_tiles(int64_t M, int64_t N, const QueryRows<acc_t>& qr, const KeyTile<acc_t>& kt, int64_t b, int64_t hk,
                   int64_t j0, int64_t nk) {
    if (turned_)
      turned_scores(nk, kv_rows(k_, s_, b, hk, j0), sk_, b, j0, qa_.data(), qb_.data(), p_.data());
    else
      gemm<acc_t>(M, N, s_.Dp, qr.q, s_.Dp, kt.kt, kBlockK, p_.data(), kBlockK, false);
    gemm<acc_t>(M, N, s_.Dp, qr.dout, s_.Dp, kt.vt, kBlockK, ds_.data(), kBlockK, false);
  }

  // Row r of p_ (query i, bias row br, against keys [j0, j0 + nk)) from scores to
  // probabilities: pitch bias, mask, exp(s - lse).
  void probs_row(const BiasRow<acc_t>& br, int64_t i, int64_t r, int64_t j0, int64_t nk, int64_t N,
                 const KeyTile<acc_t>& kt, acc_t lse, int64_t lq, int64_t lk) {
    acc_t* prow = p_.data() + r * kBlockK;
    if (br.active() && kt.any_voiced) add_bias_row(br, kt.bias_keys, N, prow);
    mask_row(prow, key_limit(i, j0, nk, lq, lk, in_.causal), N);
    exp_row(prow, N, lse);
  }

  // Recomputes P (p_) and dS = P (dP - delta) (ds_) of query rows [i0, i0 + nq) against
  // keys [j0, j0 + nk); rows nq..M-1 become 0. Bias gradient pieces are added to `col`
  // (per key) and `rows` (per query row). The mask goes on the scores first, then one pass
  // per row does the rest: the masked keys stay -inf because their bias is finite (the
  // contract's beta > 0 bounds the exp kind's term by alpha; a tensor beta is not checked).
  void probs_and_grads(int64_t b, int64_t h, int64_t i0, int64_t nq, int64_t M, const QueryRows<acc_t>& qr,
                       int64_t j0, int64_t nk, int64_t N, const KeyTile<acc_t>& kt, int64_t lq, int64_t lk,
                       acc_t* col, BiasRowGrads<acc_t>* rows) {
    score_tiles(M, N, qr, kt, b, h / s_.G, j0, nk);
    for (int64_t r = 0; r < nq; ++r) {
      acc_t* prow = p_.data() + r * kBlockK;
      const BiasRow<acc_t> br = bias_row(b, h, i0 + r);
      // With no voiced key in the tile the bias and its gradients are 0 there.
      const bool biased = br.active() && kt.any_voiced;
      mask_row(prow, key_limit(i0 + r, j0, nk, lq, lk, in_.causal), N);
      const BiasRowGrads<acc_t> g =
          probs_grads_row(br, biased, kt.bias_keys, N, qr.lse[r], qr.delta[r], prow, ds_.data() + r * kBlockK, col);
      if (biased) rows[r] += g;
    }
    std::fill(p_.begin() + nq * kBlockK, p_.begin() + M * kBlockK, acc_t(0));
    std::fill(ds_.begin() + nq * kBlockK, ds_.begin() + M * kBlockK, acc_t(0));
  }

  // Rows from i0 of head g of the group in the query cache.
  QueryRows<acc_t> query_rows(int64_t g, int64_t i0) const {
    const int64_t row0 = g * tq_rows_ + i0;
    return QueryRows<acc_t>{qc_.data() + row0 * s_.Dp, doc_.data() + row0 * s_.Dp, lsec_.data() + row0,
                            deltac_.data() + row0};
  }

  const Inputs& in_;
  const Shape s_;
  const Side<acc_t>& sq_;
  const Side<acc_t>& sk_;
  const scalar_t* dout_;
  const acc_t* lse_;
  const acc_t* delta_;
  const int64_t n_kb_;
  const bool turned_;  // scores of a lone query row from qa_, qb_ (scores_turn_query)
  // Tile work buffers.
  std::vector<acc_t> p_, ds_, dk_acc_, dv_acc_, col_, dpitch_, delta_tile_, dq_row_;
  std::vector<acc_t> qa_, qb_;  // the cached query row, interleaved for turned_scores
  // Key cache of (b, hk) = keys_of_ (the key and value tiles allocated on first use).
  std::vector<acc_t> kc_, ktc_, vtc_;
  KeyPitchCache<acc_t> keys_;  // bias inputs of the cached keys
  int64_t keys_of_ = -1;
  // Query cache of (b, hk) = queries_of_, G heads of tq_rows_ rows each.
  std::vector<acc_t> qc_, doc_, lsec_, deltac_;
  int64_t queries_of_ = -1, tq_rows_ = 0;
  const scalar_t *q_, *k_, *v_;  // the inputs' data (data_ptr checks the dtype on every call)
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
    const Side<acc_t> sq = make_side<acc_t>(in.fq, s.B, s.Tq, s.D, in.beta_factors);
    const Side<acc_t> sk = make_side<acc_t>(in.fk, s.B, s.Tk, s.D, in.beta_factors);
    at::Tensor delta = row_deltas<scalar_t, acc_t>(dout, out, in.stat);
    const scalar_t* dout_ptr = dout.data_ptr<scalar_t>();
    const acc_t* lse_ptr = lse.data_ptr<acc_t>();
    Partials<acc_t> qpart{new_output({kQKinds, s.B, s.H, s.Tq}, stat_opts, in.poison), s.B * s.H * s.Tq};
    Partials<acc_t> kpart{new_output({kKKinds, s.B, s.Hk, s.Tk}, stat_opts, in.poison), s.B * s.Hk * s.Tk};

    using Task = BackwardTask<scalar_t, acc_t>;
    const int64_t query_tasks = s.B * s.H * ceil_div(s.Tq, kBlockQ);
    if (Task::kExactDelta) {
      // Rows the pass skips (no allowed key) keep their finite, unused <dout, out>.
      at::Tensor exact = delta.clone();
      acc_t* exact_ptr = exact.data_ptr<acc_t>();
      const acc_t* inexact_ptr = delta.data_ptr<acc_t>();
      parallel_tasks(
          query_tasks, [&] { return Task(in, sq, sk, dout_ptr, lse_ptr, inexact_ptr); },
          [&](Task& task, int64_t t) { task.run_deltas(t, exact_ptr); });
      delta = exact;
    }
    const acc_t* delta_ptr = delta.data_ptr<acc_t>();

    const KeyChunks chunks(s, static_cast<int64_t>(sizeof(acc_t)));
    ChunkSums<acc_t> sums(new_output({chunks.count, s.B, s.H, s.Tq + kRows, s.Dp}, stat_opts, in.poison),
                          chunks.count * s.B * s.H * s.Tq, s.Tq + kRows, s.Dp);
    for (int64_t c = 0; c < chunks.count; ++c)
      for (int64_t b = 0; b < s.B; ++b)
        for (int64_t h = 0; h < s.H; ++h) {
          acc_t* tail = sums.dq(c, b, h, in.lq[b], s);
          std::fill(tail, tail + kRows * s.Dp, acc_t(0));
        }
    scalar_t* dk_ptr = dk.data_ptr<scalar_t>();
    scalar_t* dv_ptr = dv.data_ptr<scalar_t>();
    const auto make_task = [&] { return Task(in, sq, sk, dout_ptr, lse_ptr, delta_ptr); };
    parallel_tasks(s.B * s.Hk * chunks.count, make_task,
                   [&](Task& task, int64_t t) { task.run_keys(t, chunks, dk_ptr, dv_ptr, kpart, sums); });

    scalar_t* dq_ptr = dq.data_ptr<scalar_t>();
    parallel_tasks(query_tasks, make_task,
                   [&](Task& task, int64_t t) { task.finish_queries(t, chunks, dq_ptr, qpart, sums); });
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
