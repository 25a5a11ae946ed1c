// Fused 2D Matryoshka InfoNCE on the CPU: every (layer, nested dim) pair in one call.
//
// Math (docs/design.md, "The loss" and "The prefix trick"), for layer l, nested dims d_1 < ... < d_M, segments
// seg_m = [d_{m-1}, d_m):
//
//   S_m     = S_{m-1} + Q[:, seg_m] K[:, seg_m]^T         one accumulator over D
//   z_m     = scale * diag(rq_m) S_m diag(rk_m)             rq_m = 1 / max(|q[:d_m]|, eps)
//   LSE_i   = max_i + log sum_j exp(z_m(i, j) - max_i)          one pass: rows against a block of columns
//
// Row statistics are kept RELATIVE to the row maximum (max and log-sum stored apart), and
// the backward recomputes every logit with the same tiles, GEMM calls and expression as
// the forward, so exp(z - max - logsum) carries no ulp(scale) error at large scales. This
// needs -ffp-contract=off (both build paths pass it): a fused multiply-add would compute
// z - max from the unrounded z, differently in different loops. Both also pass
// -fno-trapping-math, without which GCC keeps vector_exp's clamps as branches and no epilogue
// loop vectorises.
//
// Backward, with G_m = dLoss/dcos_m and W_m = diag(rq_m) G_m diag(rk_m):
//
//   dQ[:, seg_s] = H_s K[:, seg_s] - alpha_s Q[:, seg_s]      H_s = sum_{m >= s} W_m
//   dK[:, seg_s] = H_s^T Q[:, seg_s] - beta_s K[:, seg_s]     alpha_s = sum_{m >= s} rq_m^2 rowsum(G_m cos_m)
//
// The W_m tiles of a tile pair are kept, so S_m is accumulated once per tile pair, not
// once per active dim. Work is split into tiles of kRowBlock queries x column_tile(N)
// candidates; each tile product is a single-threaded BLAS GEMM (gemm()) into a per-thread buffer,
// followed by plain loops for the epilogue. No B x N matrix and no per-tile copy of dQ is
// allocated: extra memory is O((B + N) x D + threads x tile). Cross-tile reductions are
// added "in turn" (tile 0, then 1, ...; a thread waits on a condition variable, never
// spins), so results are bitwise independent of the number of threads.
//
// The extension is one pass of the backend contract (m2d_kernels/backends/base.py): pass_forward and
// pass_backward, rows against a block of columns, under the rules of m2d_kernels/rules.py: "dot" (unit inverse norms, running maximum, no norm term), a per-tile
// keep mask (own group, guide similarity above the row's threshold) applied before any
// exponential, a per-tile penalty coefficient (stop-gradient: it changes z, not d z / d s),
// and the teacher (pair L-1, M-1) whose tile weights are formed once per tile and shared by
// every pair. The rules become template arguments once per call (pick_forward /
// pick_backward), so the plain pass runs loops with no rule in them. The guide
// product and the teacher tile are per tile for all layers, so with them a task covers every
// layer of its row block (forward) or column tile (backward); extra memory stays
// O(threads x M x tile).
//
// Shared tiles (the joint directions): with rules.triangle (rows = the first R columns, only
// j > i or j >= R scored) a (row block, column tile) pair wholly at or below the diagonal is
// skipped, no GEMM and no exponential, and a tile crossing it is multiplied in strips that skip
// most of what lies below it (kStripRows); with rules.column_statistics = K the first K columns also
// get softmax statistics over the rows (no penalty), the "statistic columns" of Problem (the symmetric
// loss's doc->query direction, when the positives are the first K columns). Under a fixed maximum and no penalty a column's logits and maximum are its rows', so one
// exponential per entry serves both softmaxes, forward and backward (Problem::shares_exponentials).
// Only the tiles that hold an excluded entry run the kernels that read the keep mask
// (Problem::tile_excludes): own-group columns are every group_period-th, so most tiles hold none.

#include <torch/extension.h>

#include <omp.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <mutex>
#include <type_traits>
#include <vector>

// MKL's C entry point (mkl_service.h maps mkl_set_num_threads_local to it; the lower-case
// symbol is the Fortran one, taking a pointer), exported by the MKL inside libtorch_cpu
// when torch uses MKL; null otherwise (weak).
extern "C" int MKL_Set_Num_Threads_Local(int) __attribute__((weak));
// The Fortran BLAS GEMMs (32-bit integers, as ATen's CPUBlas declares them) that libtorch_cpu exports
// when built with a BLAS; null otherwise (weak), and gemm() below falls back to ATen's mm.
extern "C" void sgemm_(const char*, const char*, const int*, const int*, const int*, const float*, const float*,
                       const int*, const float*, const int*, const float*, float*, const int*) __attribute__((weak));
extern "C" void dgemm_(const char*, const char*, const int*, const int*, const int*, const double*, const double*,
                       const int*, const double*, const int*, const double*, double*, const int*)
    __attribute__((weak));

namespace {

// Queries per tile: 128 rather than 64 halves the GEMM's packing of each column segment per FLOP
// (fwd+bwd 519 -> 398 ms at L=7, B=1024, N=2048 on the 2-core VM; 256 gained nothing more).
constexpr int64_t kRowBlock = 128;
constexpr int64_t kColumnGranule = 64;  // column tiles are multiples of this
constexpr int64_t kMaxColTile = 512;    // candidates per tile: 128 x 512 fp32 = 256 KiB, stays in L2
// Triangle: a tile crossing the diagonal is multiplied in strips of kStripRows rows (dQ too; dK in
// strips of as many columns), each from the first column its top row scores, rounded down to
// kStripAlign: its GEMMs skip what lies below the diagonal (a 128-row diagonal tile costs ~0.6x).
constexpr int64_t kStripRows = 32;
constexpr int64_t kStripAlign = 16;
// Multiply-adds per thread below which waking another thread costs more than it saves.
constexpr int64_t kWorkPerThread = int64_t(1) << 22;

// Candidates per tile, a function of N only (so forward and backward share the tiles and
// the result does not depend on the thread count): at least 4 tiles when N allows, so that
// the backward, parallel over column tiles, keeps every thread busy at small N.
int64_t column_tile(int64_t n) {
  return std::clamp<int64_t>((n / 4 + kColumnGranule - 1) / kColumnGranule * kColumnGranule, kColumnGranule,
                             kMaxColTile);
}

// exp for float as a branch-free polynomial (Cephes expf, ~1 ulp) so that the epilogue
// loops vectorise; std::exp only vectorises under -ffast-math, which would break NaN
// propagation. Comparisons are written so that NaN passes through the clamps.
inline float vector_exp(float x) {
  constexpr float kLow = -87.3f;
  constexpr float kHigh = 88.7f;
  constexpr float kRound = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  x = x < kLow ? kLow : x;
  x = x > kHigh ? kHigh : x;
  const float shifted = x * 1.44269504088896341f + kRound;
  const float n = shifted - kRound;
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  int32_t shifted_bits;
  std::memcpy(&shifted_bits, &shifted, sizeof(float));
  const int32_t exponent_bits = (shifted_bits - 0x4B400000 + 127) << 23;  // 2^n
  float two_to_n;
  std::memcpy(&two_to_n, &exponent_bits, sizeof(float));
  return p * two_to_n;
}

inline double vector_exp(double x) { return std::exp(x); }

// exp(x) for a kept entry, 0 for an excluded one, whose x (a logit -inf, or an offset of -inf) is never
// exponentiated: no inf or NaN reaches the sums. Branch-free, so the loops that call it vectorise.
template <typename T>
inline T exp_if_kept(bool kept, T x) {
  const T e = vector_exp(kept ? x : T(0));
  return kept ? e : T(0);
}

// Makes ATen and MKL run single-threaded on the calling thread while alive: the tile GEMMs
// run inside our own parallel tasks, and a GEMM that opened its own team would both
// oversubscribe the cores and could change the summation order between forward and
// backward. Both settings are thread-local, so other Python threads are unaffected.
class SerialGemms {
 public:
  SerialGemms() : omp_threads_(omp_get_max_threads()) {
    omp_set_num_threads(1);
    if (MKL_Set_Num_Threads_Local) mkl_threads_ = MKL_Set_Num_Threads_Local(1);
  }
  ~SerialGemms() {
    omp_set_num_threads(omp_threads_);
    if (MKL_Set_Num_Threads_Local) MKL_Set_Num_Threads_Local(mkl_threads_);
  }
  SerialGemms(const SerialGemms&) = delete;
  SerialGemms& operator=(const SerialGemms&) = delete;

 private:
  int omp_threads_;
  int mkl_threads_ = 0;
};

// A 64-byte aligned scratch array: the same alignment in forward and backward, so the
// GEMM takes the same code path for the same tile.
template <typename T>
class Scratch {
 public:
  explicit Scratch(int64_t n)
      : data_(static_cast<T*>(std::aligned_alloc(64, (std::max<int64_t>(n, 1) * sizeof(T) + 63) / 64 * 64))) {
    TORCH_CHECK(data_ != nullptr, "m2d cpp backend: out of memory for a tile buffer");
  }
  T* get() const { return data_.get(); }

 private:
  struct Free {
    void operator()(T* p) const { std::free(p); }
  };
  std::unique_ptr<T, Free> data_;
};

// Ordered hand-over: work for turn t of a slot runs after turn t - 1 of that slot has run.
// Tasks are handed out in increasing order (schedule(dynamic)), so every turn a thread
// waits for belongs to a task already started: no deadlock. Waiting sleeps on a condition
// variable, so a busy machine gets the core back instead of a spinning thread.
class Turns {
 public:
  explicit Turns(int64_t slots) : next_(slots, 0) {}

  template <typename Work>
  void run_in_turn(int64_t slot, int64_t turn, const Work& work) {
    std::unique_lock<std::mutex> lock(mutex_);
    ready_.wait(lock, [&] { return next_[slot] == turn; });
    lock.unlock();
    work();
    lock.lock();
    ++next_[slot];
    lock.unlock();
    ready_.notify_all();
  }

 private:
  std::mutex mutex_;
  std::condition_variable ready_;
  std::vector<int64_t> next_;
};

// The rules of one rows-vs-columns pass (m2d_kernels/rules.py), runtime values: each kernel
// call turns them into template arguments once (pick_* below), so the inner loops of the
// plain pass have no rule in them.
enum Penalty : int64_t { kNoPenalty = 0, kInBatchNegatives = 1, kHardNegatives = 2, kAllNegatives = 3 };

template <typename T>
struct PassRules {
  bool normalised = true;              // "cos"; false: "dot" (the caller passes unit inverse norms)
  int64_t group_period = 0;            // column j is in group j % group_period
  const int64_t* row_group = nullptr;  // [B] group of each row
  bool exclude_own_group = false;
  int64_t penalty = kNoPenalty;
  T penalty_strength = 0;
  const T* guide_rows = nullptr;       // [B, guide_dim], no gradient
  const T* guide_cols = nullptr;       // [N, guide_dim]
  const T* guide_threshold = nullptr;  // [B]
  int64_t guide_dim = 0;
  bool teacher = false;  // forward: teacher-weighted sums; backward: the distillation gradient
  bool triangle = false;  // rows are the first R columns: only j > i or j >= R is scored
  int64_t column_statistics = 0;  // K: the first K columns' softmax statistics over the rows

  bool guided() const { return guide_rows != nullptr; }
  bool excludes() const { return exclude_own_group || guided(); }
  bool penalises() const { return penalty != kNoPenalty; }
  bool masked() const { return excludes() || penalises(); }
  // Whether some tile fills keep / penalty: a tile with an excluded entry or a penalty (Problem::tile_excludes;
  // the triangle's j <= i needs the mask only in the teacher's loop).
  bool has_tile_masks() const { return masked() || (triangle && teacher); }
  // The guide product and the teacher tile are computed once per tile for every layer, so a
  // task then covers all layers of its rows (forward) or columns (backward).
  bool shares_tiles_across_layers() const { return guided() || teacher; }
};

// Everything a tile needs, for one call. Pointers are into contiguous tensors.
template <typename T>
struct Problem {
  const T* q;        // [L, B, D], rows contiguous; layers q_stride apart (a prefix of a longer tensor's rows)
  const T* k;        // [L, N, D]
  const T* inv_q;    // [L, B, M]  1 / max(|q[:d_m]|, eps)
  const T* inv_k;    // [L, N, M]
  const int64_t* positive;  // [B] row of docs holding query i's positive
  int64_t L, B, N, D, M, col_tile, n_blocks, n_tiles, q_stride;
  T scale;
  T max_logit;  // bound of every cosine logit: scale, plus the penalty strength when there is one
  bool fixed_max;
  PassRules<T> rules;
  std::vector<int64_t> starts, ends;  // segment m is [starts[m], ends[m])
  std::vector<uint8_t> active;        // [L, M]
  std::vector<int64_t> last;          // [L] largest active m, -1 if none
  // The statistic columns (rules.column_statistics = K): columns 0..K-1 are also softmaxes over the rows;
  // their statistics are [L, K, M].
  int64_t n_slots = 0;
  // Backward with shares_exponentials(): softmax_weight of every row [L, B, M] and statistic column
  // [L, K, M], once per call rather than per tile.
  std::vector<T> row_weights, col_weights;

  // The statistic columns before column `col`.
  int64_t stats_begin(int64_t col) const { return std::min(col, n_slots); }
  // Triangle: the pair (row block at r0, column tile [c0, c0 + nc)) has only j <= i entries.
  bool skipped(int64_t r0, int64_t c0, int64_t nc) const { return rules.triangle && c0 + nc - 1 <= r0; }
  // Triangle: a pair that is not skipped but holds some j <= i entry (needs the keep mask).
  bool on_diagonal(int64_t r0, int64_t nr, int64_t c0) const { return rules.triangle && c0 <= r0 + nr - 1; }
  // Triangle: the first column of the tile [c0, c0 + nc) that row `row` scores (j > row), else 0. The
  // epilogues start there: on a diagonal tile the keep mask would zero the columns before it anyway,
  // so skipping them halves the tile's exponentials without changing a result.
  int64_t first_scored(int64_t row, int64_t c0, int64_t nc) const {
    return rules.triangle ? std::clamp<int64_t>(row + 1 - c0, 0, nc) : 0;
  }
  // The first tile column that the strip of rows from r0 + i0 multiplies (nc or more: none of them).
  int64_t strip_start(int64_t r0, int64_t i0, int64_t c0, int64_t nc, bool diagonal) const {
    return diagonal ? first_scored(r0 + i0, c0, nc) / kStripAlign * kStripAlign : 0;
  }
  // The rows [0, end) of a diagonal tile that score some column of [j0, j1) (j > i).
  int64_t strip_rows_end(int64_t r0, int64_t nr, int64_t c0, int64_t j1, bool diagonal) const {
    return diagonal ? std::clamp<int64_t>(c0 + j1 - 1 - r0, 0, nr) : nr;
  }
  // Column statistics 0..K-1 whose logits and maximum are their rows' (cos, fixed maximum, no penalty):
  // one exponential per entry serves the row and the column softmax, forward and backward.
  bool shares_exponentials() const { return n_slots > 0 && fixed_max && !rules.penalises() && !rules.teacher; }
  // Whether the tile holds an excluded entry that the epilogues would reach, so that it needs the keep
  // mask and the kernels that read it: with a guide every tile; the tiles where some row's own-group
  // column lies at or after the row's first scored column (the own group is every group_period-th
  // column, so most tiles hold none). The triangle's j <= i needs no mask: every loop starts at
  // first_scored, except the teacher's, so with a teacher its diagonal tiles take the mask too.
  bool tile_excludes(int64_t r0, int64_t nr, int64_t c0, int64_t nc) const {
    if (rules.guided() || (rules.teacher && on_diagonal(r0, nr, c0))) return true;
    const int64_t period = rules.group_period;
    if (!rules.exclude_own_group || period <= 0) return false;
    for (int64_t i = 0; i < nr; ++i) {
      const int64_t group = rules.row_group[r0 + i];
      if (group < 0 || group >= period) continue;
      const int64_t from = c0 + first_scored(r0 + i, c0, nc);  // the row's own columns from here on
      if (from + ((group - from) % period + period) % period < c0 + nc) return true;
    }
    return false;
  }
  // The backward's column tile of task slot `index` (of n_tiles per layer): in order, or with the
  // triangle from the last, whose tiles hold the most rows, so that two threads finish together.
  int64_t backward_tile(int64_t index) const { return rules.triangle ? n_tiles - 1 - index : index; }
  // The turn of column tile `tile` in row block r0's dQ sum: the order the tasks start in. The
  // triangle's skipped tiles, a row block's first ones, come last in its reversed order: no turn.
  int64_t dq_turn(int64_t tile) const { return rules.triangle ? n_tiles - 1 - tile : tile; }
  // Row r of layer l of q.
  const T* q_row(int64_t l, int64_t r) const { return q + l * q_stride + r * D; }
  // The logit and the cosine of one tile entry, written once so that forward and backward
  // evaluate the same expression in the same order.
  T logit(T row_scale, T s, T rk) const { return row_scale * s * rk; }
};

// The logit of a row's tile entry j under the rules: Problem::logit, plus the penalty strength
// times the (stop-gradient) cosine on penalised entries (pen_row[j] is 0 on the others).
template <bool kPenalty, typename T>
inline T entry_logit(const Problem<T>& p, T row_scale, T rq, T s, T rk, const T* pen_row, int64_t j) {
  if constexpr (kPenalty) return p.logit(row_scale, s, rk) + pen_row[j] * (rq * s * rk);
  return p.logit(row_scale, s, rk);
}

// `fixed_max`: the caller's decision (m2d_kernels.numerics.fixed_max_is_exact) that max_logit bounds every
// logit with exp(-2 * max_logit) still a normal number, so sum_j exp(logit - max_logit) is exact without a
// running maximum. Only cosines have the bound.
template <typename T>
Problem<T> make_problem(const at::Tensor& q, const at::Tensor& k, const at::Tensor& inv_q, const at::Tensor& inv_k,
                        const at::Tensor& positive, const std::vector<int64_t>& dims, const at::Tensor& active,
                        double scale, bool fixed_max, const PassRules<T>& rules) {
  Problem<T> p;
  p.q = q.data_ptr<T>();
  p.k = k.data_ptr<T>();
  p.inv_q = inv_q.data_ptr<T>();
  p.inv_k = inv_k.data_ptr<T>();
  p.positive = positive.data_ptr<int64_t>();
  p.L = q.size(0);
  p.B = q.size(1);
  p.N = k.size(1);
  p.D = q.size(2);
  p.q_stride = q.stride(0);
  p.M = static_cast<int64_t>(dims.size());
  p.col_tile = column_tile(p.N);
  p.n_blocks = (p.B + kRowBlock - 1) / kRowBlock;
  p.n_tiles = (p.N + p.col_tile - 1) / p.col_tile;
  p.scale = static_cast<T>(scale);
  p.rules = rules;
  p.max_logit = p.scale + (rules.penalises() ? rules.penalty_strength : T(0));
  TORCH_CHECK(!fixed_max || rules.normalised, "m2d cpp backend: a fixed maximum needs cosine similarity");
  p.fixed_max = fixed_max;
  for (int64_t m = 0; m < p.M; ++m) {
    p.starts.push_back(m == 0 ? 0 : dims[m - 1]);
    p.ends.push_back(dims[m]);
  }
  const bool* flags = active.data_ptr<bool>();
  p.active.assign(flags, flags + p.L * p.M);
  p.last.assign(p.L, -1);
  for (int64_t l = 0; l < p.L; ++l)
    for (int64_t m = 0; m < p.M; ++m)
      if (p.active[l * p.M + m]) p.last[l] = m;
  TORCH_CHECK(!rules.teacher || p.active[p.L * p.M - 1],
              "m2d cpp backend: the teacher pair (last layer, largest dim) must be active");
  TORCH_CHECK(!rules.triangle || p.B <= p.N, "m2d cpp backend: rules.triangle needs R <= C");
  TORCH_CHECK(rules.column_statistics >= 0 && rules.column_statistics <= p.N,
              "m2d cpp backend: rules.column_statistics must be in [0, C]");
  TORCH_CHECK(!rules.column_statistics || !rules.shares_tiles_across_layers(),
              "m2d cpp backend: rules.column_statistics takes no guide or teacher");
  p.n_slots = rules.column_statistics;
  return p;
}

// (row block, column tile) pairs computed, forward and backward (once per task that visits the
// pair): the evidence that the triangle skips tiles (tile_pairs_computed). One relaxed atomic add
// per tile pair, against a GEMM of kRowBlock x col_tile x D.
std::atomic<int64_t> tile_pairs{0};

int64_t threads_for(int64_t work, int64_t tasks, int64_t n_threads) {
  return std::max<int64_t>(1, std::min({n_threads, tasks, work / kWorkPerThread}));
}

// Runs `tasks` (a body with orphaned `omp for` loops) on `threads` threads. One thread opens
// no OpenMP region at all (a one-thread region made every ATen GEMM start a nested team).
template <typename Tasks>
void run_tasks(int64_t threads, const Tasks& tasks) {
  if (threads > 1) {
#pragma omp parallel num_threads(threads)
    {
      SerialGemms serial;
      tasks();
    }
  } else {
    SerialGemms serial;
    tasks();
  }
}

// A [rows, cols] view of caller-owned memory, for ATen.
template <typename T>
at::Tensor view(const T* data, int64_t rows, int64_t cols, int64_t row_stride) {
  return at::from_blob(const_cast<T*>(data), {rows, cols}, {row_stride, 1},
                       at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value));
}

// Row-major C[m, n] = op(A) op(B) (+ C when `accumulate`), op = transpose when the flag is set; A is
// [m, k] (or [k, m] transposed) with row stride lda, B [k, n] (or [n, k]) with ldb. Straight to the BLAS
// that ATen's mm would call: a tile makes hundreds of small GEMMs, and ATen's per-call cost (tensor
// views, dispatch) adds up over them. The same call for the same tile in forward and
// backward, so recomputed logits stay bitwise the forward's.
template <typename T>
void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, const T* a, int64_t lda, const T* b,
          int64_t ldb, bool accumulate, T* c, int64_t ldc) {
  constexpr bool kFloat = std::is_same_v<T, float>;
  if ((kFloat ? sgemm_ != nullptr : dgemm_ != nullptr) &&
      std::max({m, n, k, lda, ldb, ldc}) <= std::numeric_limits<int>::max()) {
    // Column-major BLAS: C^T = op(B)^T op(A)^T, each row-major buffer read as its transpose.
    const char op_b = trans_b ? 'T' : 'N', op_a = trans_a ? 'T' : 'N';
    const int cm = static_cast<int>(n), cn = static_cast<int>(m), ck = static_cast<int>(k);
    const int ldb_i = static_cast<int>(ldb), lda_i = static_cast<int>(lda), ldc_i = static_cast<int>(ldc);
    const T one = 1, beta = accumulate ? 1 : 0;
    if constexpr (kFloat) {
      sgemm_(&op_b, &op_a, &cm, &cn, &ck, &one, b, &ldb_i, a, &lda_i, &beta, c, &ldc_i);
    } else {
      dgemm_(&op_b, &op_a, &cm, &cn, &ck, &one, b, &ldb_i, a, &lda_i, &beta, c, &ldc_i);
    }
    return;
  }
  auto a_view = trans_a ? view(a, k, m, lda).t() : view(a, m, k, lda);
  auto b_view = trans_b ? view(b, n, k, ldb).t() : view(b, k, n, ldb);
  auto out = view(c, m, n, ldc);
  if (accumulate) {
    out.addmm_(a_view, b_view);
  } else {
    at::mm_out(out, a_view, b_view);
  }
}

// s[nr, nc] (+)= Q[l, r0:, seg_m] K[l, c0:, seg_m]^T; on a triangle's diagonal tile, strip by strip
// from each strip's first scored column (the entries left of it are never read). Forward and backward
// both call this, with the same arguments, for every tile: the recomputed logits are bitwise the forward's.
template <typename T>
void accumulate_segment(const Problem<T>& p, int64_t l, int64_t m, int64_t r0, int64_t nr, int64_t c0, int64_t nc, T* s,
                        bool diagonal = false) {
  const int64_t a = p.starts[m], width = p.ends[m] - a, strip = diagonal ? kStripRows : nr;
  for (int64_t i0 = 0; i0 < nr; i0 += strip) {
    const int64_t rows = std::min(strip, nr - i0), j0 = p.strip_start(r0, i0, c0, nc, diagonal);
    if (j0 >= nc) continue;
    gemm(false, true, rows, nc - j0, width, p.q_row(l, r0 + i0) + a, p.D,
         p.k + (l * p.N + c0 + j0) * p.D + a, p.D, m > 0, s + i0 * nc + j0, nc);
  }
}

// dQ[nr, seg_m] = H K[l, c0:, seg_m] and dK[l, c0:, seg_m] += H^T Q[l, r0:, seg_m] for one tile's H
// (zero left of each row's first scored column): on a diagonal tile by row strips (dQ) and column
// strips (dK), skipping the zeros below the diagonal as accumulate_segment does.
template <typename T>
void tile_input_gradients(const Problem<T>& p, int64_t l, int64_t m, int64_t r0, int64_t nr, int64_t c0, int64_t nc,
                          const T* h, T* dq, T* dk, bool diagonal) {
  const int64_t a = p.starts[m], width = p.ends[m] - a, strip = diagonal ? kStripRows : std::max(nr, nc);
  const T* q = p.q_row(l, r0) + a;
  const T* k = p.k + (l * p.N + c0) * p.D + a;
  for (int64_t i0 = 0; i0 < nr; i0 += strip) {
    const int64_t rows = std::min(strip, nr - i0), j0 = std::min(p.strip_start(r0, i0, c0, nc, diagonal), nc);
    if (j0 == nc) {
      for (int64_t i = i0; i < i0 + rows; ++i) std::fill(dq + i * p.D + a, dq + i * p.D + a + width, T(0));
    } else {
      gemm(false, false, rows, width, nc - j0, h + i0 * nc + j0, nc, k + j0 * p.D, p.D, false, dq + i0 * p.D + a, p.D);
    }
  }
  for (int64_t j0 = 0; j0 < nc; j0 += strip) {
    const int64_t cols = std::min(strip, nc - j0), rows = p.strip_rows_end(r0, nr, c0, j0 + cols, diagonal);
    if (rows == 0) continue;
    gemm(true, false, cols, width, rows, h + j0, nc, q, p.D, true, dk + j0 * p.D + a, p.D);
  }
}

// The teacher layer's S_m of a tile, one buffer per dim (tile_size apart): the teacher pair
// (largest dim) is needed before the layer's smaller dims. Each S_m starts as a copy of
// S_{m-1}, so the values are bitwise those of accumulating in place.
template <typename T>
void teacher_layer_segments(const Problem<T>& p, int64_t r0, int64_t nr, int64_t c0, int64_t nc, T* s,
                            int64_t tile_size) {
  for (int64_t m = 0; m < p.M; ++m) {
    T* out = s + m * tile_size;
    if (m > 0) std::copy(out - tile_size, out - tile_size + nr * nc, out);
    accumulate_segment(p, p.L - 1, m, r0, nr, c0, nc, out);
  }
}

// Per-tile data of the rules, shared by every (layer, dim) pair of the tile.
template <typename T>
struct TileRules {
  const T* keep = nullptr;             // [nr, nc] 1 where the column is kept, 0 where excluded
  const T* penalty = nullptr;          // [nr, nc] penalty strength where penalised, else 0
  const T* teacher = nullptr;          // [nr, nc] forward: exp(z_T - offset_T); backward: p_T (0 where excluded)
  const T* teacher_rescale = nullptr;  // [nr] forward: exp(previous offset_T - offset_T)
};

// Fills keep and penalty (TileRules) for rows [r0, r0 + nr) and columns [c0, c0 + nc) with
// rules.py's classes (the triangle's j <= i among them: row i < R, so j <= i implies j < R). The guide similarities are one small GEMM into `guide`, per tile: no
// B x N guide matrix exists.
template <typename T>
void rules_tile(const Problem<T>& p, int64_t r0, int64_t nr, int64_t c0, int64_t nc, T* guide, T* keep, T* pen) {
  const PassRules<T>& r = p.rules;
  if (r.guided()) {
    const int64_t dg = r.guide_dim;
    gemm(false, true, nr, nc, dg, r.guide_rows + r0 * dg, dg, r.guide_cols + c0 * dg, dg, false, guide, nc);
  }
  // Fills, then the few special columns: the own group's (every group_period-th column, no modulo per
  // entry), the positive, the triangle's first columns.
  const int64_t period = r.group_period;
  const T other_penalty = r.penalty == kInBatchNegatives || r.penalty == kAllNegatives ? r.penalty_strength : T(0);
  for (int64_t i = 0; i < nr; ++i) {
    const int64_t group = r.row_group != nullptr ? r.row_group[r0 + i] : -1;
    T* keep_row = keep + i * nc;
    T* pen_row = pen + i * nc;
    std::fill(pen_row, pen_row + nc, other_penalty);
    if (r.guided()) {
      const T threshold = r.guide_threshold[r0 + i];
      const T* guide_row = guide + i * nc;
#pragma omp simd
      for (int64_t j = 0; j < nc; ++j) keep_row[j] = guide_row[j] > threshold ? T(0) : T(1);
      const int64_t positive = p.positive[r0 + i] - c0;  // never guided out
      if (positive >= 0 && positive < nc) keep_row[positive] = T(1);
    } else {
      std::fill(keep_row, keep_row + nc, T(1));
    }
    if (period > 0 && group >= 0 && group < period) {
      for (int64_t col = c0 + ((group - c0) % period + period) % period; col < c0 + nc; col += period) {
        if (r.exclude_own_group) keep_row[col - c0] = T(0);
        if (r.penalty == kInBatchNegatives) pen_row[col - c0] = T(0);
        if (r.penalty == kHardNegatives && col >= period) pen_row[col - c0] = r.penalty_strength;
      }
    }
    if (r.penalty == kAllNegatives && group >= c0 && group < c0 + nc) pen_row[group - c0] = T(0);
    if (r.triangle) std::fill(keep_row, keep_row + p.first_scored(r0 + i, c0, nc), T(0));
  }
}

// Teacher weights of a tile, out[i, j] = exp((z_T - offset[i]) - shift[i]) (0 where excluded),
// from the teacher pair's logits s: the forward's exp(z_T - offset_T) with shift 0, the
// backward's p_T with shift = log_sum_T. With z_sum, also sum_j out[i, j] * z_T[i, j] per row.
template <bool kExclude, bool kPenalty, typename T>
void teacher_tile(const Problem<T>& p, int64_t r0, int64_t nr, int64_t c0, int64_t nc, const T* s, T* rk,
                  const T* offset, const T* shift, const TileRules<T>& rules, T* out, T* z_sum) {
  const int64_t l = p.L - 1, m = p.M - 1;
  const T* inv_k = p.inv_k + (l * p.N + c0) * p.M + m;
  const T* inv_q = p.inv_q + (l * p.B + r0) * p.M + m;
  for (int64_t j = 0; j < nc; ++j) rk[j] = inv_k[j * p.M];
  for (int64_t i = 0; i < nr; ++i) {
    const T rq = inv_q[i * p.M], row_scale = p.scale * rq, base = offset[i], sh = shift[i];
    const T* s_row = s + i * nc;
    const T* keep_row = rules.keep + i * nc;
    const T* pen_row = rules.penalty + i * nc;
    T* out_row = out + i * nc;
    T total = 0;
#pragma omp simd reduction(+ : total)
    for (int64_t j = 0; j < nc; ++j) {
      const T z = entry_logit<kPenalty>(p, row_scale, rq, s_row[j], rk[j], pen_row, j);
      T weight;
      if constexpr (kExclude) {
        weight = exp_if_kept(keep_row[j] != 0, (z - base) - sh);
      } else {
        weight = vector_exp((z - base) - sh);
      }
      out_row[j] = weight;
      total += weight * z;
    }
    if (z_sum != nullptr) z_sum[i] = total;
  }
}

// ---------------------------------------------------------------- forward

// (max, sum_j exp(z_j - max), sum_j exp(z_j - max) * cos_j) of a set of logits.
template <typename T>
struct SoftmaxStats {
  T max, sum, cos_sum;
};

// Merges `part` into `total`, rescaling both to the larger maximum. A side with nothing kept
// (running maximum -inf, sum 0) leaves the other as it is: no exp(-inf - -inf).
template <typename T>
void merge(SoftmaxStats<T>& total, const SoftmaxStats<T>& part) {
  constexpr T kMinusInf = -std::numeric_limits<T>::infinity();
  if (part.max == kMinusInf) return;
  if (total.max == kMinusInf) {
    total = part;
    return;
  }
  if (part.max == total.max) {  // the fixed maximum: plain sums (and no exponential in the merge's turn)
    total.sum += part.sum;
    total.cos_sum += part.cos_sum;
    return;
  }
  const T new_max = std::max(total.max, part.max);
  const T a = std::exp(total.max - new_max), b = std::exp(part.max - new_max);
  total.sum = total.sum * a + part.sum * b;
  total.cos_sum = total.cos_sum * a + part.cos_sum * b;
  total.max = new_max;
}

// Row statistics of one row block over all column tiles ([layers of the task, M, nr] each:
// slot (l - l0) * M + m), and the partial statistics of the statistic columns over this row
// block ([n_slots, M], by slot; one layer per task).
template <typename T>
struct BlockStats {
  std::vector<SoftmaxStats<T>> rows, columns;
  std::vector<T> positive_logit, teacher_sum;
};

// Folds one tile of pair (l, m) into the row statistics (at `slot`). kScaleGrad adds sum_j exp(z_j - max) * cos_j beside the sum, for d loss / d scale;
// kExclude drops the excluded entries (before any exponential), kPenalty adds the penalty,
// kTeacher accumulates sum_j exp(z_T - offset_T) * z_j (the tile's teacher weights).
// kColumnSums: the statistic columns 0..K-1 (contiguous) under a fixed maximum and no penalty, where a
// column's logit and maximum are its rows' (z, scale), so one exponential serves both softmaxes: the
// columns' sums accumulate in `column_sums` (col_tile) and replace column_epilogue's second pass.
template <bool kScaleGrad, bool kExclude, bool kPenalty, bool kTeacher, bool kColumnSums, typename T>
void forward_epilogue(const Problem<T>& p, int64_t l, int64_t m, int64_t slot, int64_t r0, int64_t nr, int64_t c0,
                      int64_t nc, const T* s, T* rk, T* column_sums, BlockStats<T>& stats, const TileRules<T>& rules) {
  static_assert(!(kScaleGrad && (kExclude || kPenalty || kTeacher)), "d loss / d scale is for plain rules only");
  static_assert(!(kColumnSums && (kScaleGrad || kPenalty || kTeacher)), "shared column sums: fixed maximum, no penalty");
  // The tile's statistic columns: [0, n_columns).
  const int64_t n_columns = kColumnSums ? std::clamp<int64_t>(p.n_slots - c0, 0, nc) : 0;
  if constexpr (kColumnSums) std::fill(column_sums, column_sums + n_columns, T(0));
  constexpr T kMinusInf = -std::numeric_limits<T>::infinity();
  const T* inv_k = p.inv_k + (l * p.N + c0) * p.M + m;
  const T* inv_q = p.inv_q + (l * p.B + r0) * p.M + m;
  for (int64_t j = 0; j < nc; ++j) rk[j] = inv_k[j * p.M];
  for (int64_t i = 0; i < nr; ++i) {
    const T rq = inv_q[i * p.M];
    const T row_scale = p.scale * rq;
    const T* s_row = s + i * nc;
    const T* keep_row = rules.keep + i * nc;
    const T* pen_row = rules.penalty + i * nc;
    const T* teacher_row = rules.teacher + i * nc;
    const int64_t first = p.first_scored(r0 + i, c0, nc);
    if (first == nc) continue;  // the triangle: nothing of this row in the tile (its statistics stay)
    SoftmaxStats<T>& row = stats.rows[slot * nr + i];
    T new_max = p.max_logit;
    if (!p.fixed_max) {
      T tile_max = kMinusInf;
#pragma omp simd reduction(max : tile_max)
      for (int64_t j = first; j < nc; ++j) {
        T z = entry_logit<kPenalty>(p, row_scale, rq, s_row[j], rk[j], pen_row, j);
        if constexpr (kExclude) z = keep_row[j] != 0 ? z : kMinusInf;
        tile_max = std::max(tile_max, z);
      }
      new_max = std::max(row.max, tile_max);
    }
    // A row with nothing kept so far (maximum -inf) takes its (unused) exponents against 0.
    const T base = kExclude && new_max == kMinusInf ? T(0) : new_max;
    T tile_sum = 0, tile_cos_sum = 0, tile_teacher = 0;
    if constexpr (kScaleGrad) {
#pragma omp simd reduction(+ : tile_sum, tile_cos_sum)
      for (int64_t j = 0; j < nc; ++j) {
        const T e = vector_exp(p.logit(row_scale, s_row[j], rk[j]) - new_max);
        tile_sum += e;
        tile_cos_sum += e * (rq * s_row[j] * rk[j]);
      }
    } else {
      int64_t j_rest = first;  // the entries after the statistic columns
      if constexpr (kColumnSums) {
        j_rest = std::max(first, n_columns);
#pragma omp simd reduction(+ : tile_sum)
        for (int64_t j = first; j < n_columns; ++j) {
          const T z = p.logit(row_scale, s_row[j], rk[j]);
          T e;
          if constexpr (kExclude) {
            e = exp_if_kept(keep_row[j] != 0, z - base);
          } else {
            e = vector_exp(z - new_max);
          }
          tile_sum += e;
          column_sums[j] += e;
        }
      }
#pragma omp simd reduction(+ : tile_sum, tile_teacher)
      for (int64_t j = j_rest; j < nc; ++j) {
        const T z = entry_logit<kPenalty>(p, row_scale, rq, s_row[j], rk[j], pen_row, j);
        if constexpr (kExclude) {
          tile_sum += exp_if_kept(keep_row[j] != 0, z - base);
        } else {
          tile_sum += vector_exp(z - new_max);
        }
        if constexpr (kTeacher) tile_teacher += teacher_row[j] * z;  // weight 0 where excluded, z finite
      }
    }
    // Both maxima -inf (nothing kept yet): the sum stays 0 rather than 0 * exp(nan).
    const T rescale = p.fixed_max || (kExclude && row.max == new_max) ? T(1) : vector_exp(row.max - new_max);
    row.sum = row.sum * rescale + tile_sum;
    if constexpr (kScaleGrad) row.cos_sum = row.cos_sum * rescale + tile_cos_sum;
    if constexpr (kTeacher) {
      T& teacher_sum = stats.teacher_sum[slot * nr + i];
      teacher_sum = teacher_sum * rules.teacher_rescale[i] + tile_teacher;
    }
    row.max = new_max;
    const int64_t pos = p.positive[r0 + i] - c0;
    if (pos >= first && pos < nc) {  // one before `first` is excluded: -inf (forward_impl)
      T z = entry_logit<kPenalty>(p, row_scale, rq, s_row[pos], rk[pos], pen_row, pos);
      if constexpr (kExclude) z = keep_row[pos] != 0 ? z : kMinusInf;
      stats.positive_logit[slot * nr + i] = z;
    }
  }
  for (int64_t j = 0; j < n_columns; ++j) stats.columns[(c0 + j) * p.M + m] = SoftmaxStats<T>{p.scale, column_sums[j], 0};
}

// The statistic columns (Problem) of one tile of pair (l, m), over this row block: each lies in
// exactly one tile, so a block writes each slot once. Column logits carry no penalty; excluded
// entries are dropped before any exponential; the fixed maximum of a column is `scale`.
// Row-major, vectorised across the tile's statistic columns: entry e is tile column j0 + e (the row
// pointers below start at j0). `buffer` holds 3 x col_tile.
template <bool kScaleGrad, bool kExclude, typename T>
void column_epilogue(const Problem<T>& p, int64_t l, int64_t m, int64_t r0, int64_t nr, int64_t c0, int64_t nc,
                     const T* s, T* rk, T* buffer, BlockStats<T>& stats, const TileRules<T>& rules) {
  static_assert(!(kScaleGrad && kExclude), "d loss / d scale is for plain rules only");
  constexpr T kMinusInf = -std::numeric_limits<T>::infinity();
  const int64_t e0 = p.stats_begin(c0), n = p.stats_begin(c0 + nc) - e0;
  if (n == 0) return;
  const int64_t j0 = e0 - c0, shift = j0;
  const T* inv_k = p.inv_k + (l * p.N + c0) * p.M + m;
  const T* inv_q = p.inv_q + (l * p.B + r0) * p.M + m;
  for (int64_t j = 0; j < nc; ++j) rk[j] = inv_k[j * p.M];
  const T* rk_at = rk + shift;
  T* col_max = buffer;
  T* col_sum = buffer + p.col_tile;
  T* col_cos_sum = buffer + 2 * p.col_tile;
  for (int64_t e = 0; e < n; ++e) {
    col_max[e] = p.fixed_max ? p.scale : kMinusInf;
    col_sum[e] = 0;
    col_cos_sum[e] = 0;
  }
  // The triangle's rows score only j > i: the first entry row i reaches (contiguous columns only).
  if (!p.fixed_max) {
    for (int64_t i = 0; i < nr; ++i) {
      const T row_scale = p.scale * inv_q[i * p.M];
      const T* s_row = s + i * nc + shift;
      const T* keep_row = rules.keep + i * nc + shift;
      const int64_t first = std::clamp<int64_t>(p.first_scored(r0 + i, c0, nc) - j0, 0, n);
#pragma omp simd
      for (int64_t e = first; e < n; ++e) {
        T z = p.logit(row_scale, s_row[e], rk_at[e]);
        if constexpr (kExclude) z = keep_row[e] != 0 ? z : kMinusInf;
        col_max[e] = std::max(col_max[e], z);
      }
    }
  }
  for (int64_t i = 0; i < nr; ++i) {
    const T rq = inv_q[i * p.M];
    const T row_scale = p.scale * rq;
    const T* s_row = s + i * nc + shift;
    const T* keep_row = rules.keep + i * nc + shift;
    const int64_t first = std::clamp<int64_t>(p.first_scored(r0 + i, c0, nc) - j0, 0, n);
#pragma omp simd
    for (int64_t e = first; e < n; ++e) {
      const T z = p.logit(row_scale, s_row[e], rk_at[e]);
      if constexpr (kExclude) {
        const T base = col_max[e] == kMinusInf ? T(0) : col_max[e];  // a column with nothing kept so far
        col_sum[e] += exp_if_kept(keep_row[e] != 0, z - base);
      } else {
        const T x = vector_exp(z - col_max[e]);
        col_sum[e] += x;
        if constexpr (kScaleGrad) col_cos_sum[e] += x * (rq * s_row[e] * rk_at[e]);
      }
    }
  }
  for (int64_t e = 0; e < n; ++e)
    stats.columns[(e0 + e) * p.M + m] = SoftmaxStats<T>{col_max[e], col_sum[e], col_cos_sum[e]};
}

// The forward's kernels for one call's rules, chosen once (outside every loop).
template <typename T>
struct ForwardKernels {
  using Epilogue = void (*)(const Problem<T>&, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t,
                            const T*, T*, T*, BlockStats<T>&, const TileRules<T>&);
  using Teacher = void (*)(const Problem<T>&, int64_t, int64_t, int64_t, int64_t, const T*, T*, const T*, const T*,
                           const TileRules<T>&, T*, T*);
  using Column = void (*)(const Problem<T>&, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, const T*, T*, T*,
                          BlockStats<T>&, const TileRules<T>&);
  Epilogue epilogue;          // every pair
  Epilogue teacher_epilogue;  // the teacher pair itself: its weights come after its maximum
  Teacher teacher;
  Column column;  // the statistic columns (Problem::n_slots > 0), unless the epilogue sums them
};

// Calls f(std::integral_constant<bool, flag>): a runtime rule becomes a template argument.
template <typename F>
auto with_flag(bool flag, const F& f) {
  return flag ? f(std::true_type{}) : f(std::false_type{});
}

// `excludes`: the kernels of the tiles holding an excluded entry (Problem::tile_excludes).
template <bool kScaleGrad, typename T>
ForwardKernels<T> pick_forward(const Problem<T>& p, bool excludes) {
  const PassRules<T>& rules = p.rules;
  if constexpr (kScaleGrad) {
    return {&forward_epilogue<true, false, false, false, false, T>, nullptr, nullptr,
            &column_epilogue<true, false, T>};  // plain rules, optionally with column statistics
  } else {
    return with_flag(excludes, [&](auto exclude) {
      constexpr bool kE = decltype(exclude)::value;
      if (p.shares_exponentials())
        return ForwardKernels<T>{&forward_epilogue<false, kE, false, false, true, T>, nullptr, nullptr, nullptr};
      return with_flag(rules.penalises(), [&](auto penalty) {
        constexpr bool kP = decltype(penalty)::value;
        return ForwardKernels<T>{
            rules.teacher ? &forward_epilogue<false, kE, kP, true, false, T>
                          : &forward_epilogue<false, kE, kP, false, false, T>,
            &forward_epilogue<false, kE, kP, false, false, T>, &teacher_tile<kE, kP, T>, &column_epilogue<false, kE, T>};
      });
    });
  }
}

// kScaleGrad: also each softmax's mean cosine E_p[cos] (rows and statistic columns), for d loss / d scale;
// plain rules only (rules.scale_slope).
template <typename T, bool kScaleGrad>
std::vector<at::Tensor> forward_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& inv_q,
                                     const at::Tensor& inv_k, const at::Tensor& positive,
                                     const std::vector<int64_t>& dims, const at::Tensor& active, double scale,
                                     bool fixed_max, int64_t n_threads, const PassRules<T>& rules) {
  const Problem<T> p = make_problem<T>(q, k, inv_q, inv_k, positive, dims, active, scale, fixed_max, rules);
  TORCH_CHECK(!kScaleGrad || !(rules.masked() || rules.penalises() || rules.teacher || rules.triangle),
              "m2d cpp backend: the scale's slope takes plain rules");
  // [0]: the tiles with nothing excluded; [1]: the others (Problem::tile_excludes).
  const ForwardKernels<T> kernels[2] = {pick_forward<kScaleGrad>(p, false), pick_forward<kScaleGrad>(p, true)};
  auto opts = q.options();
  constexpr T kMinusInf = -std::numeric_limits<T>::infinity();
  const T start_max = p.fixed_max ? p.max_logit : kMinusInf;
  const T column_start_max = p.fixed_max ? p.scale : kMinusInf;  // column logits carry no penalty
  // Saved for the backward: each direction's maximum and log of the scaled sum, apart.
  at::Tensor row_max = at::zeros({p.L, p.B, p.M}, opts), row_logsum = at::zeros({p.L, p.B, p.M}, opts);
  at::Tensor col_max = at::zeros({p.n_slots > 0 ? p.L : 0, p.n_slots, p.M}, opts);
  at::Tensor col_logsum = at::zeros({p.n_slots > 0 ? p.L : 0, p.n_slots, p.M}, opts);
  at::Tensor positive_logit = at::zeros({p.L, p.B, p.M}, opts);
  at::Tensor teacher_sum = at::zeros({rules.teacher ? p.L : 0, p.B, p.M}, opts);
  // E_p[cos] of each row and statistic column (kScaleGrad).
  at::Tensor row_mean_cos = at::zeros({kScaleGrad ? p.L : 0, p.B, p.M}, opts);
  at::Tensor col_mean_cos = at::zeros({kScaleGrad && p.n_slots > 0 ? p.L : 0, p.n_slots, p.M}, opts);
  // Forward-only: the columns' merged statistics.
  std::vector<SoftmaxStats<T>> columns(p.L * p.n_slots * p.M, SoftmaxStats<T>{column_start_max, 0, 0});
  T* row_max_ptr = row_max.data_ptr<T>();
  T* row_logsum_ptr = row_logsum.data_ptr<T>();
  T* col_max_ptr = col_max.data_ptr<T>();
  T* col_logsum_ptr = col_logsum.data_ptr<T>();
  T* positive_logit_ptr = positive_logit.data_ptr<T>();
  T* teacher_sum_ptr = teacher_sum.data_ptr<T>();
  Turns turns(p.L);  // column partials merge in row-block order, per layer
  const int64_t layers_per_task = rules.shares_tiles_across_layers() ? p.L : 1;
  const int64_t n_tasks = p.L / layers_per_task * p.n_blocks;
  const int64_t teacher_slot = (p.L - 1) % layers_per_task * p.M + p.M - 1;

  run_tasks(threads_for(p.L * p.B * p.N * p.D, n_tasks, n_threads), [&] {
    const int64_t tile_size = kRowBlock * p.col_tile;
    const int64_t rules_size = rules.has_tile_masks() ? tile_size : 0, teacher_size = rules.teacher ? tile_size : 0;
    Scratch<T> s(tile_size), rk(p.col_tile), column_buffer(p.n_slots > 0 ? 3 * p.col_tile : 0);
    Scratch<T> keep(rules_size), pen(rules_size), guide(rules.guided() ? tile_size : 0);
    // The teacher layer's logits (one tile per dim), weights, and per-row offset, shift, rescale, own sum.
    Scratch<T> teacher_s(p.M * teacher_size), teacher_w(teacher_size), teacher_rows(rules.teacher ? 4 * kRowBlock : 0);
    const TileRules<T> tile_rules{keep.get(), pen.get(), teacher_w.get(), teacher_rows.get() + 2 * kRowBlock};
    BlockStats<T> stats;
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < n_tasks; ++task) {
      // Block-major: the tasks running together are of different layers, whose column merges (one turn
      // order per layer) do not wait for each other; and the triangle's longest blocks start first.
      const int64_t layer_tasks = p.L / layers_per_task;
      const int64_t l0 = task % layer_tasks * layers_per_task, block = task / layer_tasks;
      const int64_t r0 = block * kRowBlock, nr = std::min(kRowBlock, p.B - r0);
      const int64_t slots = layers_per_task * p.M * nr;
      if (layers_per_task == 1 && p.last[l0] < 0) continue;
      stats.rows.assign(slots, SoftmaxStats<T>{start_max, 0, 0});
      stats.positive_logit.assign(slots, 0);
      stats.teacher_sum.assign(rules.teacher ? slots : 0, 0);
      stats.columns.assign(p.n_slots * p.M, SoftmaxStats<T>{column_start_max, 0, 0});
      for (int64_t c0 = 0; c0 < p.N; c0 += p.col_tile) {
        const int64_t nc = std::min(p.col_tile, p.N - c0);
        if (p.skipped(r0, c0, nc)) continue;  // the triangle: no GEMM, no exponential
        tile_pairs.fetch_add(1, std::memory_order_relaxed);
        const bool diagonal = p.on_diagonal(r0, nr, c0);
        const bool excludes = p.tile_excludes(r0, nr, c0, nc);
        const ForwardKernels<T>& tile_kernels = kernels[excludes];
        if (excludes || rules.penalises()) rules_tile(p, r0, nr, c0, nc, guide.get(), keep.get(), pen.get());
        if (rules.teacher) {
          // The teacher pair first: its updated maximum is the offset of this tile's weights.
          T* offset = teacher_rows.get();
          T* shift = offset + kRowBlock;
          T* rescale = offset + 2 * kRowBlock;
          T* own_sum = offset + 3 * kRowBlock;
          const T* teacher_logits = teacher_s.get() + (p.M - 1) * tile_size;
          teacher_layer_segments(p, r0, nr, c0, nc, teacher_s.get(), tile_size);
          for (int64_t i = 0; i < nr; ++i) rescale[i] = stats.rows[teacher_slot * nr + i].max;
          tile_kernels.teacher_epilogue(p, p.L - 1, p.M - 1, teacher_slot, r0, nr, c0, nc, teacher_logits, rk.get(),
                                        nullptr, stats, tile_rules);
          for (int64_t i = 0; i < nr; ++i) {
            const T previous = rescale[i], current = stats.rows[teacher_slot * nr + i].max;
            offset[i] = current == -std::numeric_limits<T>::infinity() ? T(0) : current;
            shift[i] = 0;
            rescale[i] = previous == current ? T(1) : vector_exp(previous - current);
          }
          tile_kernels.teacher(p, r0, nr, c0, nc, teacher_logits, rk.get(), offset, shift, tile_rules,
                               teacher_w.get(), own_sum);
          for (int64_t i = 0; i < nr; ++i) {
            T& sum = stats.teacher_sum[teacher_slot * nr + i];
            sum = sum * rescale[i] + own_sum[i];
          }
        }
        for (int64_t l = l0; l < l0 + layers_per_task; ++l) {
          const bool teacher_layer = rules.teacher && l == p.L - 1;
          for (int64_t m = 0; m <= p.last[l]; ++m) {
            const T* s_m = teacher_layer ? teacher_s.get() + m * tile_size : s.get();
            if (!teacher_layer) accumulate_segment(p, l, m, r0, nr, c0, nc, s.get(), diagonal);
            if (!p.active[l * p.M + m]) continue;
            if (!(teacher_layer && m == p.M - 1))
              tile_kernels.epilogue(p, l, m, (l - l0) * p.M + m, r0, nr, c0, nc, s_m, rk.get(), column_buffer.get(),
                                    stats, tile_rules);
            if (tile_kernels.column != nullptr && p.n_slots > 0)
              tile_kernels.column(p, l, m, r0, nr, c0, nc, s_m, rk.get(), column_buffer.get(), stats, tile_rules);
          }
        }
      }
      for (int64_t l = l0; l < l0 + layers_per_task; ++l) {
        for (int64_t m = 0; m <= p.last[l]; ++m) {
          if (!p.active[l * p.M + m]) continue;
          const int64_t slot = ((l - l0) * p.M + m) * nr;
          for (int64_t i = 0; i < nr; ++i) {
            const int64_t at = (l * p.B + r0 + i) * p.M + m;
            const SoftmaxStats<T>& row = stats.rows[slot + i];
            // A row whose every column is excluded: offset 0, log_sum -inf (the fixed maximum's sum
            // cannot underflow to 0: fixed_max_is_exact).
            row_max_ptr[at] = row.sum == 0 ? T(0) : row.max;
            row_logsum_ptr[at] = std::log(row.sum);
            // A positive at or below the triangle's diagonal is excluded (its tile may have been skipped).
            const int64_t positive_col = p.positive[r0 + i];
            const bool below = rules.triangle && positive_col >= 0 && positive_col <= r0 + i;
            positive_logit_ptr[at] = below ? kMinusInf : stats.positive_logit[slot + i];
            if constexpr (kScaleGrad) row_mean_cos.data_ptr<T>()[at] = row.cos_sum / row.sum;
            if (rules.teacher) teacher_sum_ptr[at] = stats.teacher_sum[slot + i];
          }
        }
      }
      if (p.n_slots > 0) {  // one layer per task (make_problem)
        turns.run_in_turn(l0, block, [&] {
          for (int64_t slot = 0; slot < p.n_slots; ++slot)
            for (int64_t m = 0; m <= p.last[l0]; ++m)
              if (p.active[l0 * p.M + m])
                merge(columns[(l0 * p.n_slots + slot) * p.M + m], stats.columns[slot * p.M + m]);
        });
      }
    }
  });

  // The statistic columns: a column with nothing kept has offset 0 and log_sum -inf.
  for (int64_t l = 0; l < p.L; ++l)
    for (int64_t slot = 0; slot < p.n_slots; ++slot)
      for (int64_t m = 0; m < p.M; ++m) {
        if (!p.active[l * p.M + m]) continue;
        const int64_t at = (l * p.n_slots + slot) * p.M + m;
        col_max_ptr[at] = columns[at].sum == 0 ? T(0) : columns[at].max;
        col_logsum_ptr[at] = std::log(columns[at].sum);
        if constexpr (kScaleGrad) col_mean_cos.data_ptr<T>()[at] = columns[at].cos_sum / columns[at].sum;
      }
  return {row_max, row_logsum, positive_logit, teacher_sum, col_max, col_logsum, row_mean_cos, col_mean_cos};
}

// ---------------------------------------------------------------- backward

// Which statistic columns (Problem) a kernel handles: none, or columns 0..K-1 (kColumns);
// kSharedColumns: columns 0..K-1 with one exponential for both softmaxes (Problem::shares_exponentials).
enum StatColumns : int { kNoColumns = 0, kColumns = 1, kSharedColumns = 2 };

// 1 / sum_j exp(z_j - scale) of each softmax under the fixed maximum, from its saved (max, log_sum):
// exp(z - max - log_sum) = exp(z - scale) * weight. 0 for a softmax with nothing kept (its max is 0
// and log_sum -inf), whose entries are all excluded anyway.
template <typename T>
std::vector<T> softmax_weights(const Problem<T>& p, const T* max, const T* log_sum, int64_t n) {
  std::vector<T> weights(n);
  for (int64_t e = 0; e < n; ++e)
    weights[e] = std::isinf(log_sum[e]) ? T(0) : std::exp((p.scale - max[e]) - log_sum[e]);
  return weights;
}

// W_m = G_m * rq * rk for one tile, into w; writes rowsum(G_m * cos_m) into gc_row and adds
// the column sums to gc_col. G_m = coef * (softmax_row - onehot(p)) (+ softmax_column on the
// statistic columns), softmax = exp((z - max) - logsum)
// with the forward's z (the column side without penalty); with kDistill, G_m = (coef + distill) *
// softmax - coef * onehot - distill * p_T. Excluded entries get 0 (kExclude), penalised ones the
// penalty in z only (it carries no gradient). Both softmaxes enter G before W and the norm terms'
// sums (gc_row, gc_col) are formed, so those need nothing more. `col_buffer` holds 2 x col_tile.
// kSharedColumns: both softmaxes as exp(z - scale) times each one's softmax weight, one exponential.
template <bool kExclude, bool kPenalty, bool kDistill, int kStatColumns, typename T>
void gradient_tile(const Problem<T>& p, int64_t l, int64_t m, int64_t r0, int64_t nr, int64_t c0, int64_t nc,
                   const T* s, T* w, T* rk, T coef, T distill, const T* row_max, const T* row_logsum,
                   const T* col_max, const T* col_logsum, T* gc_row, T* gc_col, T* col_buffer,
                   const TileRules<T>& rules) {
  static_assert(!(kDistill && kStatColumns != kNoColumns), "column statistics take no distillation");
  static_assert(!(kPenalty && kStatColumns == kSharedColumns), "shared exponentials: no penalty");
  const T* inv_k = p.inv_k + (l * p.N + c0) * p.M + m;
  for (int64_t j = 0; j < nc; ++j) rk[j] = inv_k[j * p.M];
  // kSharedColumns: the tile's statistic columns [0, n_columns) and their softmax weights.
  const int64_t n_columns = kStatColumns == kSharedColumns ? std::clamp<int64_t>(p.n_slots - c0, 0, nc) : 0;
  T* column_weight = col_buffer;
  for (int64_t j = 0; j < n_columns; ++j) column_weight[j] = p.col_weights[(l * p.n_slots + c0 + j) * p.M + m];
  for (int64_t i = 0; i < nr; ++i) {
    const int64_t at = (l * p.B + r0 + i) * p.M + m;
    const T rq = p.inv_q[at];
    const T row_scale = p.scale * rq;
    const T max = row_max[at], logsum = row_logsum[at];
    const T* s_row = s + i * nc;
    const T* keep_row = rules.keep + i * nc;
    const T* pen_row = rules.penalty + i * nc;
    const T* teacher_row = rules.teacher + i * nc;
    T* w_row = w + i * nc;
    const int64_t first = p.first_scored(r0 + i, c0, nc);
    std::fill(w_row, w_row + first, T(0));
    if constexpr (kStatColumns == kSharedColumns) {
      const T row_weight = p.row_weights[at];
      const int64_t j_rest = std::max(first, n_columns);
#pragma omp simd
      for (int64_t j = first; j < n_columns; ++j) {
        const T z = p.logit(row_scale, s_row[j], rk[j]);
        const T e = kExclude ? exp_if_kept(keep_row[j] != 0, z - p.scale) : vector_exp(z - p.scale);
        w_row[j] = e * (row_weight + column_weight[j]);
      }
#pragma omp simd
      for (int64_t j = j_rest; j < nc; ++j) {
        const T z = p.logit(row_scale, s_row[j], rk[j]);
        const T e = kExclude ? exp_if_kept(keep_row[j] != 0, z - p.scale) : vector_exp(z - p.scale);
        w_row[j] = e * row_weight;
      }
    } else {
#pragma omp simd
      for (int64_t j = first; j < nc; ++j) {
        const T z = entry_logit<kPenalty>(p, row_scale, rq, s_row[j], rk[j], pen_row, j);
        T prob;
        if constexpr (kExclude) {
          prob = exp_if_kept(keep_row[j] != 0, (z - max) - logsum);
        } else {
          prob = vector_exp((z - max) - logsum);
        }
        if constexpr (kDistill) {
          w_row[j] = (coef + distill) * prob - distill * teacher_row[j];
        } else {
          w_row[j] = prob;
        }
      }
    }
    const int64_t pos = p.positive[r0 + i] - c0;
    // Before `first` (the triangle's j <= i) the positive is excluded.
    if (pos >= first && pos < nc && (!kExclude || keep_row[pos] != 0)) w_row[pos] -= kDistill ? coef : T(1);
  }
  if constexpr (kStatColumns == kColumns) {
    const int64_t e0 = p.stats_begin(c0), n = p.stats_begin(c0 + nc) - e0;
    const int64_t j0 = e0 - c0;  // as in column_epilogue
    const T* rk_at = rk + j0;
    T* max = col_buffer;
    T* logsum = col_buffer + p.col_tile;
    for (int64_t e = 0; e < n; ++e) {
      const int64_t at = (l * p.n_slots + e0 + e) * p.M + m;
      max[e] = col_max[at];
      logsum[e] = col_logsum[at];
    }
    for (int64_t i = 0; i < nr; ++i) {
      const T row_scale = p.scale * p.inv_q[(l * p.B + r0 + i) * p.M + m];
      const T* s_row = s + i * nc + j0;
      const T* keep_row = rules.keep + i * nc + j0;
      T* w_row = w + i * nc + j0;
      const int64_t first = std::clamp<int64_t>(p.first_scored(r0 + i, c0, nc) - j0, 0, n);
#pragma omp simd
      for (int64_t e = first; e < n; ++e) {
        const T z = p.logit(row_scale, s_row[e], rk_at[e]);
        if constexpr (kExclude) {
          w_row[e] += exp_if_kept(keep_row[e] != 0, (z - max[e]) - logsum[e]);
        } else {
          w_row[e] += vector_exp((z - max[e]) - logsum[e]);
        }
      }
    }
  }
  for (int64_t i = 0; i < nr; ++i) {
    const T rq = p.inv_q[(l * p.B + r0 + i) * p.M + m];
    const T* s_row = s + i * nc;
    T* w_row = w + i * nc;
    T row_sum = 0;
#pragma omp simd reduction(+ : row_sum)
    for (int64_t j = p.first_scored(r0 + i, c0, nc); j < nc; ++j) {  // 0 before (above)
      const T g = kDistill ? w_row[j] : coef * w_row[j];  // the distillation tile carries its coefficients
      const T g_cos = g * rq * s_row[j] * rk[j];
      row_sum += g_cos;
      gc_col[j] += g_cos;
      w_row[j] = g * rq * rk[j];
    }
    gc_row[i] = row_sum;
  }
}

// The backward's kernels for one call's rules, chosen once (outside every loop).
template <typename T>
struct BackwardKernels {
  using Gradient = void (*)(const Problem<T>&, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, const T*, T*, T*,
                            T, T, const T*, const T*, const T*, const T*, T*, T*, T*, const TileRules<T>&);
  Gradient gradient;
  typename ForwardKernels<T>::Teacher teacher;
};

// `excludes`: the kernels of the tiles holding an excluded entry (Problem::tile_excludes).
template <typename T>
BackwardKernels<T> pick_backward(const Problem<T>& p, bool excludes) {
  const PassRules<T>& rules = p.rules;
  return with_flag(excludes, [&](auto exclude) {
    return with_flag(rules.penalises(), [&](auto penalty) {
      constexpr bool kE = decltype(exclude)::value, kP = decltype(penalty)::value;
      typename BackwardKernels<T>::Gradient gradient = &gradient_tile<kE, kP, false, kNoColumns, T>;
      if (rules.teacher) gradient = &gradient_tile<kE, kP, true, kNoColumns, T>;
      if (p.n_slots > 0) gradient = &gradient_tile<kE, kP, false, kColumns, T>;
      if (p.shares_exponentials()) gradient = &gradient_tile<kE, false, false, kSharedColumns, T>;
      return BackwardKernels<T>{gradient, &teacher_tile<kE, kP, T>};
    });
  });
}

// Subtracts the norm term: out[r, seg_s] -= (sum_{m >= s} a[r, m] * gc[m * gc_stride + r]) * x[r, seg_s].
template <typename T>
void subtract_norm_term(const Problem<T>& p, int64_t last, int64_t rows, const T* a, const T* gc, int64_t gc_stride,
                        const T* x, T* out) {
  for (int64_t r = 0; r < rows; ++r) {
    T suffix = 0;
    for (int64_t m = last; m >= 0; --m) {
      suffix += a[r * p.M + m] * gc[m * gc_stride + r];
      for (int64_t c = p.starts[m]; c < p.ends[m]; ++c) out[r * p.D + c] -= suffix * x[r * p.D + c];
    }
  }
}

// Parallel over (layer, column tile), or over column tiles with every layer when the rules
// share per-tile data across layers: each task owns its rows of dK and adds its dQ rows into
// the shared dQ in turn (column tile 0 first), one (layer, row block) at a time.
template <typename T>
std::vector<at::Tensor> backward_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& inv_q,
                                      const at::Tensor& inv_k, const at::Tensor& norm_grad_q,
                                      const at::Tensor& norm_grad_k, const at::Tensor& positive,
                                      const std::vector<int64_t>& dims, const at::Tensor& active, double scale,
                                      bool fixed_max, const at::Tensor& row_max, const at::Tensor& row_logsum,
                                      const at::Tensor& col_max, const at::Tensor& col_logsum, const at::Tensor& coef,
                                      int64_t n_threads, const PassRules<T>& rules, const T* distill_coef) {
  Problem<T> p = make_problem<T>(q, k, inv_q, inv_k, positive, dims, active, scale, fixed_max, rules);
  // [0]: the tiles with nothing excluded; [1]: the others (Problem::tile_excludes).
  const BackwardKernels<T> kernels[2] = {pick_backward(p, false), pick_backward(p, true)};
  if (p.n_slots > 0)
    TORCH_CHECK(col_max.numel() == p.L * p.n_slots * p.M && col_logsum.numel() == col_max.numel() &&
                    col_max.scalar_type() == q.scalar_type() && col_logsum.scalar_type() == q.scalar_type() &&
                    col_max.is_contiguous() && col_logsum.is_contiguous(),
                "m2d cpp backend: the column statistics must be contiguous [L, K, M] tensors of the rows' dtype");
  at::Tensor grad_q = at::zeros({p.L, p.B, p.D}, q.options());
  // Zeroed by the task owning each column tile, in parallel: the first touch of a fresh allocation (page
  // faults, for one of this size) costs as much as the memset, and is then split over the threads.
  at::Tensor grad_k = at::empty_like(k);
  std::vector<T> gc_row(p.L * p.M * p.B, 0);  // [L, M, B]: rowsum(coef * G_m * cos_m)
  const T* coef_ptr = coef.data_ptr<T>();
  const T* row_max_ptr = row_max.data_ptr<T>();
  const T* row_logsum_ptr = row_logsum.data_ptr<T>();
  const T* col_max_ptr = p.n_slots > 0 ? col_max.data_ptr<T>() : nullptr;
  const T* col_logsum_ptr = p.n_slots > 0 ? col_logsum.data_ptr<T>() : nullptr;
  if (p.shares_exponentials()) {
    p.row_weights = softmax_weights(p, row_max_ptr, row_logsum_ptr, p.L * p.B * p.M);
    p.col_weights = softmax_weights(p, col_max_ptr, col_logsum_ptr, p.L * p.n_slots * p.M);
  }
  T* grad_q_ptr = grad_q.data_ptr<T>();
  T* grad_k_ptr = grad_k.data_ptr<T>();
  // dQ row block (l, r) takes its column tiles in turn (Problem::dq_turn; the triangle's skipped ones take none).
  Turns turns(p.L * p.n_blocks);
  const int64_t layers_per_task = rules.shares_tiles_across_layers() ? p.L : 1;
  const int64_t n_tasks = p.L / layers_per_task * p.n_tiles;

  run_tasks(threads_for(p.L * p.B * p.N * p.D, n_tasks, n_threads), [&] {
    const int64_t tile_size = kRowBlock * p.col_tile;
    const int64_t rules_size = rules.has_tile_masks() ? tile_size : 0, teacher_size = rules.teacher ? tile_size : 0;
    Scratch<T> s(tile_size), w(p.M * tile_size), rk(p.col_tile), dq(kRowBlock * p.D), gc_block(p.M * kRowBlock);
    Scratch<T> column_buffer(p.n_slots > 0 ? 2 * p.col_tile : 0);
    Scratch<T> keep(rules_size), pen(rules_size), guide(rules.guided() ? tile_size : 0);
    // The teacher layer's logits (one tile per dim), p_T, and the teacher's per-row offset and log-sum.
    Scratch<T> teacher_s(p.M * teacher_size), teacher_p(teacher_size), teacher_rows(rules.teacher ? 2 * kRowBlock : 0);
    const TileRules<T> tile_rules{keep.get(), pen.get(), teacher_p.get(), nullptr};
    std::vector<T> gc_col;
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < n_tasks; ++task) {
      // Tile-major, as the forward is block-major: tasks running together are of different layers, whose
      // dQ turns do not wait for each other.
      const int64_t layer_tasks = p.L / layers_per_task;
      const int64_t l0 = task % layer_tasks * layers_per_task, tile = p.backward_tile(task / layer_tasks);
      const int64_t c0 = tile * p.col_tile, nc = std::min(p.col_tile, p.N - c0);
      for (int64_t l = l0; l < l0 + layers_per_task; ++l)
        std::fill_n(grad_k_ptr + (l * p.N + c0) * p.D, nc * p.D, T(0));
      if (layers_per_task == 1 && p.last[l0] < 0) continue;
      gc_col.assign(layers_per_task * p.M * nc, 0);
      for (int64_t block = 0; block < p.n_blocks; ++block) {
        const int64_t r0 = block * kRowBlock, nr = std::min(kRowBlock, p.B - r0);
        if (p.skipped(r0, c0, nc)) continue;  // the triangle: no GEMM, no exponential, no turn
        tile_pairs.fetch_add(1, std::memory_order_relaxed);
        const bool diagonal = p.on_diagonal(r0, nr, c0);
        const bool excludes = p.tile_excludes(r0, nr, c0, nc);
        const BackwardKernels<T>& tile_kernels = kernels[excludes];
        if (excludes || rules.penalises()) rules_tile(p, r0, nr, c0, nc, guide.get(), keep.get(), pen.get());
        if (rules.teacher) {
          T* offset = teacher_rows.get();
          T* shift = offset + kRowBlock;
          for (int64_t i = 0; i < nr; ++i) {
            const int64_t at = ((p.L - 1) * p.B + r0 + i) * p.M + p.M - 1;
            offset[i] = row_max_ptr[at];
            shift[i] = row_logsum_ptr[at];
          }
          teacher_layer_segments(p, r0, nr, c0, nc, teacher_s.get(), tile_size);
          tile_kernels.teacher(p, r0, nr, c0, nc, teacher_s.get() + (p.M - 1) * tile_size, rk.get(), offset, shift,
                               tile_rules, teacher_p.get(), nullptr);
        }
        for (int64_t l = l0; l < l0 + layers_per_task; ++l) {
          const int64_t last = p.last[l];
          if (last < 0) continue;
          const bool teacher_layer = rules.teacher && l == p.L - 1;
          T* dk = grad_k_ptr + (l * p.N + c0) * p.D;
          for (int64_t m = 0; m <= last; ++m) {
            const T* s_m = teacher_layer ? teacher_s.get() + m * tile_size : s.get();
            if (!teacher_layer) accumulate_segment(p, l, m, r0, nr, c0, nc, s.get(), diagonal);
            if (p.active[l * p.M + m])
              tile_kernels.gradient(p, l, m, r0, nr, c0, nc, s_m, w.get() + m * nr * nc, rk.get(),
                                    coef_ptr[l * p.M + m], rules.teacher ? distill_coef[l * p.M + m] : T(0),
                                    row_max_ptr, row_logsum_ptr, col_max_ptr, col_logsum_ptr, gc_block.get() + m * nr,
                                    gc_col.data() + ((l - l0) * p.M + m) * nc, column_buffer.get(), tile_rules);
          }
          // Walk the segments from the largest dim down; w[last] accumulates H_s.
          T* h = w.get() + last * nr * nc;
          for (int64_t m = last; m >= 0; --m) {
            if (m < last && p.active[l * p.M + m]) {
              const T* w_m = w.get() + m * nr * nc;
#pragma omp simd
              for (int64_t e = 0; e < nr * nc; ++e) h[e] += w_m[e];
            }
            tile_input_gradients(p, l, m, r0, nr, c0, nc, h, dq.get(), dk, diagonal);
          }
          turns.run_in_turn(l * p.n_blocks + block, p.dq_turn(tile), [&] {
            // Only the features up to the largest active dim were written (and get a gradient).
            T* out = grad_q_ptr + (l * p.B + r0) * p.D;
            const T* in = dq.get();
            for (int64_t i = 0; i < nr; ++i)
              for (int64_t c = 0; c < p.ends[last]; ++c) out[i * p.D + c] += in[i * p.D + c];
            for (int64_t m = 0; m <= last; ++m) {
              if (!p.active[l * p.M + m]) continue;
              for (int64_t i = 0; i < nr; ++i) gc_row[(l * p.M + m) * p.B + r0 + i] += gc_block.get()[m * nr + i];
            }
          });
        }
      }
      if (!rules.normalised) continue;  // "dot": no norm term
      for (int64_t l = l0; l < l0 + layers_per_task; ++l) {
        if (p.last[l] < 0) continue;
        subtract_norm_term(p, p.last[l], nc, norm_grad_k.data_ptr<T>() + (l * p.N + c0) * p.M,
                           gc_col.data() + (l - l0) * p.M * nc, nc, p.k + (l * p.N + c0) * p.D,
                           grad_k_ptr + (l * p.N + c0) * p.D);
      }
    }
    // The implicit barrier above completes every dQ sum; now its norm term, per row block.
#pragma omp for schedule(static)
    for (int64_t task = 0; task < p.L * p.n_blocks; ++task) {
      const int64_t l = task / p.n_blocks, r0 = task % p.n_blocks * kRowBlock, nr = std::min(kRowBlock, p.B - r0);
      if (p.last[l] < 0 || !rules.normalised) continue;
      subtract_norm_term(p, p.last[l], nr, norm_grad_q.data_ptr<T>() + (l * p.B + r0) * p.M,
                         gc_row.data() + l * p.M * p.B + r0, p.B, p.q_row(l, r0),
                         grad_q_ptr + (l * p.B + r0) * p.D);
    }
  });
  return {grad_q, grad_k};
}

void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& positive) {
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu(), "m2d cpp backend: tensors must be on the CPU");
  // The rows may be a prefix of a longer tensor's (rules.triangle: the first R columns): contiguous rows whose
  // layers lie further apart.
  // A size-1 dimension's stride is never used (PyTorch calls such tensors contiguous whatever it is).
  TORCH_CHECK(q.dim() == 3 && (q.size(2) == 1 || q.stride(2) == 1) && (q.size(1) == 1 || q.stride(1) == q.size(2)) &&
                  (q.size(0) == 1 || q.stride(0) >= q.size(1) * q.size(2)),
              "m2d cpp backend: queries (rows) must be [L, B, D] with contiguous rows, layers at least B x D apart");
  TORCH_CHECK(k.is_contiguous(), "m2d cpp backend: docs (columns) must be contiguous");
  TORCH_CHECK(q.scalar_type() == k.scalar_type(), "m2d cpp backend: queries and docs must share a dtype");
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kDouble,
              "m2d cpp backend: expects float32 or float64 (convert low precision first)");
  TORCH_CHECK(positive.scalar_type() == at::kLong && positive.is_contiguous() && positive.dim() == 1 &&
                  positive.size(0) == q.size(1),
              "m2d cpp backend: positive_index must be a contiguous int64 tensor of shape [B]");
}

// A pass's rules from the extension's arguments (empty tensors: the rule is off).
template <typename T>
PassRules<T> make_rules(const at::Tensor& q, const at::Tensor& k, bool normalised, int64_t group_period,
                        const at::Tensor& row_group, bool exclude_own_group, int64_t penalty, double penalty_strength,
                        const at::Tensor& guide_rows, const at::Tensor& guide_cols, const at::Tensor& guide_threshold,
                        bool triangle, int64_t column_statistics, bool teacher) {
  PassRules<T> rules;
  rules.triangle = triangle;
  rules.column_statistics = column_statistics;
  rules.normalised = normalised;
  rules.exclude_own_group = exclude_own_group;
  TORCH_CHECK(penalty >= kNoPenalty && penalty <= kAllNegatives, "m2d cpp backend: unknown penalty code ", penalty);
  rules.penalty = penalty;
  rules.penalty_strength = static_cast<T>(penalty_strength);
  if (exclude_own_group || penalty != kNoPenalty) {
    TORCH_CHECK(group_period > 0, "m2d cpp backend: rules.group_period must be positive with groups");
    TORCH_CHECK(row_group.scalar_type() == at::kLong && row_group.is_contiguous() && row_group.dim() == 1 &&
                    row_group.size(0) == q.size(1),
                "m2d cpp backend: rules.row_group must be a contiguous int64 tensor of shape [R]");
    rules.group_period = group_period;
    rules.row_group = row_group.data_ptr<int64_t>();
  }
  if (guide_rows.numel() > 0) {
    const auto dtype = q.scalar_type();
    TORCH_CHECK(guide_rows.dim() == 2 && guide_cols.dim() == 2 && guide_rows.size(0) == q.size(1) &&
                    guide_cols.size(0) == k.size(1) && guide_rows.size(1) == guide_cols.size(1),
                "m2d cpp backend: guide_rows [R, Dg] and guide_cols [C, Dg] must match the rows and columns");
    TORCH_CHECK(guide_threshold.dim() == 1 && guide_threshold.size(0) == q.size(1),
                "m2d cpp backend: guide_threshold must have shape [R]");
    for (const at::Tensor* t : {&guide_rows, &guide_cols, &guide_threshold})
      TORCH_CHECK(t->scalar_type() == dtype && t->is_contiguous() && t->device().is_cpu(),
                  "m2d cpp backend: guide tensors must be contiguous CPU tensors of the rows' dtype");
    rules.guide_rows = guide_rows.data_ptr<T>();
    rules.guide_cols = guide_cols.data_ptr<T>();
    rules.guide_threshold = guide_threshold.data_ptr<T>();
    rules.guide_dim = guide_rows.size(1);
  }
  rules.teacher = teacher;
  return rules;
}

}  // namespace

// The pass API with rules (m2d_kernels/rules.py): rows against one block of columns.
std::vector<at::Tensor> m2d_pass_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& inv_q,
                                         const at::Tensor& inv_k, const at::Tensor& positive, std::vector<int64_t> dims,
                                         const at::Tensor& active, double scale, bool normalised, int64_t group_period,
                                         const at::Tensor& row_group, bool exclude_own_group, int64_t penalty,
                                         double penalty_strength, const at::Tensor& guide_rows,
                                         const at::Tensor& guide_cols, const at::Tensor& guide_threshold,
                                         bool triangle, int64_t column_statistics, bool teacher, bool scale_grad,
                                         bool fixed_max, int64_t n_threads) {
  check_inputs(q, k, positive);
  auto run = [&](auto zero) {
    using T = decltype(zero);
    const PassRules<T> rules =
        make_rules<T>(q, k, normalised, group_period, row_group, exclude_own_group, penalty, penalty_strength,
                      guide_rows, guide_cols, guide_threshold, triangle, column_statistics, teacher);
    return scale_grad
               ? forward_impl<T, true>(q, k, inv_q, inv_k, positive, dims, active, scale, fixed_max, n_threads, rules)
               : forward_impl<T, false>(q, k, inv_q, inv_k, positive, dims, active, scale, fixed_max, n_threads, rules);
  };
  return q.scalar_type() == at::kDouble ? run(double(0)) : run(float(0));
}

std::vector<at::Tensor> m2d_pass_backward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& inv_q,
                                          const at::Tensor& inv_k, const at::Tensor& norm_grad_q,
                                          const at::Tensor& norm_grad_k, const at::Tensor& positive,
                                          std::vector<int64_t> dims, const at::Tensor& active, double scale,
                                          bool normalised, int64_t group_period, const at::Tensor& row_group,
                                          bool exclude_own_group, int64_t penalty, double penalty_strength,
                                          const at::Tensor& guide_rows, const at::Tensor& guide_cols,
                                          const at::Tensor& guide_threshold, bool triangle, int64_t column_statistics,
                                          bool fixed_max, const at::Tensor& offset, const at::Tensor& log_sum,
                                          const at::Tensor& col_offset, const at::Tensor& col_log_sum,
                                          const at::Tensor& coef, const at::Tensor& distill_coef, int64_t n_threads) {
  check_inputs(q, k, positive);
  const bool distill = distill_coef.numel() > 0;
  TORCH_CHECK(!distill || (distill_coef.scalar_type() == q.scalar_type() && distill_coef.is_contiguous() &&
                           distill_coef.numel() == coef.numel()),
              "m2d cpp backend: distill_coef must be a contiguous [L, M] tensor of the rows' dtype");
  auto run = [&](auto zero) {
    using T = decltype(zero);
    const PassRules<T> rules =
        make_rules<T>(q, k, normalised, group_period, row_group, exclude_own_group, penalty, penalty_strength,
                      guide_rows, guide_cols, guide_threshold, triangle, column_statistics, distill);
    return backward_impl<T>(q, k, inv_q, inv_k, norm_grad_q, norm_grad_k, positive, dims, active, scale, fixed_max,
                            offset, log_sum, col_offset, col_log_sum, coef, n_threads, rules,
                            distill ? distill_coef.data_ptr<T>() : nullptr);
  };
  return q.scalar_type() == at::kDouble ? run(double(0)) : run(float(0));
}

int64_t m2d_tile_pairs_computed() { return tile_pairs.load(); }

std::vector<int64_t> m2d_tile_shape(int64_t n_cols) { return {kRowBlock, column_tile(n_cols)}; }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.doc() = "m2d-kernels: fused 2D Matryoshka InfoNCE for CPU tensors (OpenMP)";
  module.def("pass_forward", &m2d_pass_forward,
             "(rows, cols, inv_r, inv_c, positives, dims, active, scale, normalised, group_period, row_group, "
             "exclude_own_group, penalty, penalty_strength, guide_rows, guide_cols, guide_threshold, triangle, "
             "column_statistics, teacher, scale_grad, fixed_max, n_threads) -> (offset, log_sum, positive_logit, "
             "teacher_sum or empty) [L, R, M], (col_offset, col_log_sum) [L, K, M] or empty, (row_mean_cos [L, R, M], "
             "col_mean_cos [L, K, M]) or empty");
  module.def("pass_backward", &m2d_pass_backward,
             "(rows, cols, inv_r, inv_c, norm_grad_r, norm_grad_c, positives, dims, active, scale, normalised, "
             "group_period, row_group, exclude_own_group, penalty, penalty_strength, guide_rows, guide_cols, "
             "guide_threshold, triangle, column_statistics, fixed_max, offset, log_sum, col_offset, col_log_sum "
             "[L, K, M] or empty, coef [L, M], distill_coef [L, M] or empty, n_threads) -> (grad_rows, grad_cols)");
  module.def("tile_pairs_computed", &m2d_tile_pairs_computed,
             "() -> (row block, column tile) pairs computed so far by every forward and backward task");
  module.def("tile_shape", &m2d_tile_shape, "(n_cols) -> (rows per block, columns per tile)");
}
