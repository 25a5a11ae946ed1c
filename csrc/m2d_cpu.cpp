// Fused 2D Matryoshka InfoNCE on the CPU: every (layer, nested dim) pair in one call.
//
// Math (docs/design.md, section 1), for layer l, nested dims d_1 < ... < d_M, segments
// seg_m = [d_{m-1}, d_m):
//
//   S_m     = S_{m-1} + Q[:, seg_m] K[:, seg_m]^T         one accumulator over D
//   z_m     = scale * diag(rq_m) S_m diag(rk_m)             rq_m = 1 / max(|q[:d_m]|, eps)
//   loss_lm = mean_i [(max_i - z_m(i, p(i))) + log sum_j exp(z_m(i, j) - max_i)]
//             (+ the same over the positive columns, halved when symmetric)
//
// Row statistics are kept RELATIVE to the row maximum (max and log-sum stored apart), and
// the backward recomputes every logit with the same tiles, GEMM calls and expression as
// the forward, so exp(z - max - logsum) carries no ulp(scale) error at large scales. This
// needs -ffp-contract=off (both build paths pass it): a fused multiply-add would compute
// z - max from the unrounded z, differently in different loops.
//
// Backward, with G_m = dLoss/dcos_m and W_m = diag(rq_m) G_m diag(rk_m):
//
//   dQ[:, seg_s] = H_s K[:, seg_s] - alpha_s Q[:, seg_s]      H_s = sum_{m >= s} W_m
//   dK[:, seg_s] = H_s^T Q[:, seg_s] - beta_s K[:, seg_s]     alpha_s = sum_{m >= s} rq_m^2 rowsum(G_m cos_m)
//
// The W_m tiles of a tile pair are kept, so S_m is accumulated once per tile pair, not
// once per active dim. Work is split into tiles of kRowBlock queries x column_tile(N)
// candidates; each tile product is a single-threaded ATen GEMM into a per-thread buffer,
// followed by plain loops for the epilogue. No B x N matrix and no per-tile copy of dQ is
// allocated: extra memory is O((B + N) x D + threads x tile). Cross-tile reductions are
// added "in turn" (tile 0, then 1, ...; a thread waits on a condition variable, never
// spins), so results are bitwise independent of the number of threads.

#include <torch/extension.h>

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <mutex>
#include <vector>

// MKL's C entry point (mkl_service.h maps mkl_set_num_threads_local to it; the lower-case
// symbol is the Fortran one, taking a pointer), exported by the MKL inside libtorch_cpu
// when torch uses MKL; null otherwise (weak).
extern "C" int MKL_Set_Num_Threads_Local(int) __attribute__((weak));

namespace {

constexpr int64_t kRowBlock = 64;     // queries per tile
constexpr int64_t kMaxColTile = 512;  // candidates per tile: 64 x 512 fp32 = 128 KiB, stays in L2
// Multiply-adds per thread below which waking another thread costs more than it saves.
constexpr int64_t kWorkPerThread = int64_t(1) << 22;

// Candidates per tile, a function of N only (so forward and backward share the tiles and
// the result does not depend on the thread count): at least 4 tiles when N allows, so that
// the backward, parallel over column tiles, keeps every thread busy at small N.
int64_t column_tile(int64_t n) {
  return std::clamp<int64_t>((n / 4 + kRowBlock - 1) / kRowBlock * kRowBlock, kRowBlock, kMaxColTile);
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

// Everything a tile needs, for one call. Pointers are into contiguous tensors.
template <typename T>
struct Problem {
  const T* q;        // [L, B, D]
  const T* k;        // [L, N, D]
  const T* inv_q;    // [L, B, M]  1 / max(|q[:d_m]|, eps)
  const T* inv_k;    // [L, N, M]
  const int64_t* positive;  // [B] row of docs holding query i's positive
  int64_t L, B, N, D, M, col_tile, n_blocks, n_tiles;
  T scale;
  bool symmetric, fixed_max;
  std::vector<int64_t> starts, ends;  // segment m is [starts[m], ends[m])
  std::vector<uint8_t> active;        // [L, M]
  std::vector<int64_t> last;          // [L] largest active m, -1 if none
  // Queries sorted by the doc row of their positive: the columns of the doc->query direction.
  std::vector<int64_t> queries_by_positive, positive_sorted;

  int64_t positives_begin(int64_t col) const {
    return std::lower_bound(positive_sorted.begin(), positive_sorted.end(), col) - positive_sorted.begin();
  }
  // The logit and the cosine of one tile entry, written once so that forward and backward
  // evaluate the same expression in the same order.
  T logit(T row_scale, T s, T rk) const { return row_scale * s * rk; }
};

// Because |cos| <= 1, `scale` bounds every logit: when exp(-2 * scale) is still a normal
// number, sum_j exp(logit - scale) is exact without a running maximum.
template <typename T>
bool fixed_max_is_exact(T scale) {
  return 2 * scale <= (sizeof(T) == sizeof(float) ? T(80) : T(700));
}

template <typename T>
Problem<T> make_problem(const at::Tensor& q, const at::Tensor& k, const at::Tensor& inv_q, const at::Tensor& inv_k,
                        const at::Tensor& positive, const std::vector<int64_t>& dims, const at::Tensor& active,
                        double scale, bool symmetric) {
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
  p.M = static_cast<int64_t>(dims.size());
  p.col_tile = column_tile(p.N);
  p.n_blocks = (p.B + kRowBlock - 1) / kRowBlock;
  p.n_tiles = (p.N + p.col_tile - 1) / p.col_tile;
  p.scale = static_cast<T>(scale);
  p.symmetric = symmetric;
  p.fixed_max = fixed_max_is_exact(p.scale);
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
  p.queries_by_positive.resize(p.B);
  for (int64_t i = 0; i < p.B; ++i) p.queries_by_positive[i] = i;
  std::stable_sort(p.queries_by_positive.begin(), p.queries_by_positive.end(),
                   [&](int64_t a, int64_t b) { return p.positive[a] < p.positive[b]; });
  for (int64_t i : p.queries_by_positive) p.positive_sorted.push_back(p.positive[i]);
  return p;
}

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

// A [rows, cols] view of caller-owned memory, for ATen's GEMM.
template <typename T>
at::Tensor view(const T* data, int64_t rows, int64_t cols, int64_t row_stride) {
  return at::from_blob(const_cast<T*>(data), {rows, cols}, {row_stride, 1},
                       at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value));
}

// s[nr, nc] (+)= Q[l, r0:, seg_m] K[l, c0:, seg_m]^T. Forward and backward both call this,
// with the same arguments, for every tile: the recomputed logits are bitwise the forward's.
template <typename T>
void accumulate_segment(const Problem<T>& p, int64_t l, int64_t m, int64_t r0, int64_t nr, int64_t c0, int64_t nc, T* s) {
  const int64_t a = p.starts[m], width = p.ends[m] - a;
  auto qs = view(p.q + (l * p.B + r0) * p.D + a, nr, width, p.D);
  auto ks = view(p.k + (l * p.N + c0) * p.D + a, nc, width, p.D);
  auto out = view(s, nr, nc, nc);
  if (m == 0) {
    at::mm_out(out, qs, ks.t());
  } else {
    out.addmm_(qs, ks.t());
  }
}

// ---------------------------------------------------------------- forward

// (max, sum_j exp(z_j - max), sum_j exp(z_j - max) * cos_j) of a set of logits.
template <typename T>
struct SoftmaxStats {
  T max, sum, cos_sum;
};

// Merges `part` into `total`, rescaling both to the larger maximum.
template <typename T>
void merge(SoftmaxStats<T>& total, const SoftmaxStats<T>& part) {
  const T new_max = std::max(total.max, part.max);
  const T a = std::exp(total.max - new_max), b = std::exp(part.max - new_max);
  total.sum = total.sum * a + part.sum * b;
  total.cos_sum = total.cos_sum * a + part.cos_sum * b;
  total.max = new_max;
}

// Row statistics of one row block over all column tiles ([M, nr] each), and the partial
// column statistics of this row block for every positive column ([B, M], by query).
template <typename T>
struct BlockStats {
  std::vector<SoftmaxStats<T>> rows, columns;
  std::vector<T> positive_logit, positive_cos;
};

// Folds one tile of pair (l, m) into the row statistics and the positive columns' partials.
// kScaleGrad adds sum_j exp(z_j - max) * cos_j beside the sum, for d loss / d scale.
template <bool kScaleGrad, typename T>
void forward_epilogue(const Problem<T>& p, int64_t l, int64_t m, int64_t r0, int64_t nr, int64_t c0, int64_t nc,
                      const T* s, T* rk, BlockStats<T>& stats) {
  const T* inv_k = p.inv_k + (l * p.N + c0) * p.M + m;
  const T* inv_q = p.inv_q + (l * p.B + r0) * p.M + m;
  for (int64_t j = 0; j < nc; ++j) rk[j] = inv_k[j * p.M];
  for (int64_t i = 0; i < nr; ++i) {
    const T rq = inv_q[i * p.M];
    const T row_scale = p.scale * rq;
    const T* s_row = s + i * nc;
    SoftmaxStats<T>& row = stats.rows[m * nr + i];
    T new_max = p.scale;
    if (!p.fixed_max) {
      T tile_max = -std::numeric_limits<T>::infinity();
#pragma omp simd reduction(max : tile_max)
      for (int64_t j = 0; j < nc; ++j) tile_max = std::max(tile_max, p.logit(row_scale, s_row[j], rk[j]));
      new_max = std::max(row.max, tile_max);
    }
    T tile_sum = 0, tile_cos_sum = 0;
    if constexpr (kScaleGrad) {
#pragma omp simd reduction(+ : tile_sum, tile_cos_sum)
      for (int64_t j = 0; j < nc; ++j) {
        const T e = vector_exp(p.logit(row_scale, s_row[j], rk[j]) - new_max);
        tile_sum += e;
        tile_cos_sum += e * (rq * s_row[j] * rk[j]);
      }
    } else {
#pragma omp simd reduction(+ : tile_sum)
      for (int64_t j = 0; j < nc; ++j) tile_sum += vector_exp(p.logit(row_scale, s_row[j], rk[j]) - new_max);
    }
    const T rescale = vector_exp(row.max - new_max);
    row.sum = row.sum * rescale + tile_sum;
    if constexpr (kScaleGrad) row.cos_sum = row.cos_sum * rescale + tile_cos_sum;
    row.max = new_max;
    const int64_t pos = p.positive[r0 + i] - c0;
    if (pos >= 0 && pos < nc) {
      stats.positive_logit[m * nr + i] = p.logit(row_scale, s_row[pos], rk[pos]);
      if constexpr (kScaleGrad) stats.positive_cos[m * nr + i] = rq * s_row[pos] * rk[pos];
    }
  }
  if (!p.symmetric) return;
  // Each query's positive lies in exactly one column tile, so these are written once per block.
  for (int64_t e = p.positives_begin(c0), end = p.positives_begin(c0 + nc); e < end; ++e) {
    const int64_t j = p.positive_sorted[e] - c0;
    SoftmaxStats<T> column{p.scale, 0, 0};
    if (!p.fixed_max) {
      column.max = -std::numeric_limits<T>::infinity();
      for (int64_t i = 0; i < nr; ++i)
        column.max = std::max(column.max, p.logit(p.scale * inv_q[i * p.M], s[i * nc + j], rk[j]));
    }
    for (int64_t i = 0; i < nr; ++i) {
      const T rq = inv_q[i * p.M];
      const T e_i = vector_exp(p.logit(p.scale * rq, s[i * nc + j], rk[j]) - column.max);
      column.sum += e_i;
      if constexpr (kScaleGrad) column.cos_sum += e_i * (rq * s[i * nc + j] * rk[j]);
    }
    stats.columns[p.queries_by_positive[e] * p.M + m] = column;
  }
}

template <typename T, bool kScaleGrad>
std::vector<at::Tensor> forward_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& inv_q,
                                     const at::Tensor& inv_k, const at::Tensor& positive,
                                     const std::vector<int64_t>& dims, const at::Tensor& active, double scale,
                                     bool symmetric, int64_t n_threads) {
  const Problem<T> p = make_problem<T>(q, k, inv_q, inv_k, positive, dims, active, scale, symmetric);
  auto opts = q.options();
  const T start_max = p.fixed_max ? p.scale : -std::numeric_limits<T>::infinity();
  // Saved for the backward: each direction's maximum and log of the scaled sum, apart.
  at::Tensor row_max = at::zeros({p.L, p.B, p.M}, opts), row_logsum = at::zeros({p.L, p.B, p.M}, opts);
  at::Tensor col_max = at::zeros({symmetric ? p.L : 0, p.B, p.M}, opts);
  at::Tensor col_logsum = at::zeros({symmetric ? p.L : 0, p.B, p.M}, opts);
  // Forward-only: positive logits, the rows' d/dscale terms, the columns' merged statistics.
  std::vector<T> positive_logit(p.L * p.B * p.M, 0), row_dscale(kScaleGrad ? p.L * p.B * p.M : 0, 0);
  std::vector<T> positive_cos(kScaleGrad ? p.L * p.B * p.M : 0, 0);
  std::vector<SoftmaxStats<T>> columns(symmetric ? p.L * p.B * p.M : 0, SoftmaxStats<T>{start_max, 0, 0});
  T* row_max_ptr = row_max.data_ptr<T>();
  T* row_logsum_ptr = row_logsum.data_ptr<T>();
  T* col_max_ptr = col_max.data_ptr<T>();
  T* col_logsum_ptr = col_logsum.data_ptr<T>();
  Turns turns(p.L);  // column partials merge in row-block order, per layer

  run_tasks(threads_for(p.L * p.B * p.N * p.D, p.L * p.n_blocks, n_threads), [&] {
    Scratch<T> s(kRowBlock * p.col_tile), rk(p.col_tile);
    BlockStats<T> stats;
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < p.L * p.n_blocks; ++task) {
      const int64_t l = task / p.n_blocks, block = task % p.n_blocks;
      const int64_t r0 = block * kRowBlock, nr = std::min(kRowBlock, p.B - r0);
      if (p.last[l] < 0) continue;
      stats.rows.assign(p.M * nr, SoftmaxStats<T>{start_max, 0, 0});
      stats.positive_logit.assign(p.M * nr, 0);
      stats.positive_cos.assign(kScaleGrad ? p.M * nr : 0, 0);
      stats.columns.assign(symmetric ? p.B * p.M : 0, SoftmaxStats<T>{start_max, 0, 0});
      for (int64_t c0 = 0; c0 < p.N; c0 += p.col_tile) {
        const int64_t nc = std::min(p.col_tile, p.N - c0);
        for (int64_t m = 0; m <= p.last[l]; ++m) {
          accumulate_segment(p, l, m, r0, nr, c0, nc, s.get());
          if (p.active[l * p.M + m]) forward_epilogue<kScaleGrad>(p, l, m, r0, nr, c0, nc, s.get(), rk.get(), stats);
        }
      }
      for (int64_t m = 0; m <= p.last[l]; ++m) {
        if (!p.active[l * p.M + m]) continue;
        for (int64_t i = 0; i < nr; ++i) {
          const int64_t at = (l * p.B + r0 + i) * p.M + m;
          const SoftmaxStats<T>& row = stats.rows[m * nr + i];
          row_max_ptr[at] = row.max;
          row_logsum_ptr[at] = std::log(row.sum);
          positive_logit[at] = stats.positive_logit[m * nr + i];
          if constexpr (kScaleGrad) {
            positive_cos[at] = stats.positive_cos[m * nr + i];
            row_dscale[at] = row.cos_sum / row.sum - positive_cos[at];
          }
        }
      }
      if (symmetric) {
        turns.run_in_turn(l, block, [&] {
          for (int64_t i = 0; i < p.B; ++i)
            for (int64_t m = 0; m <= p.last[l]; ++m)
              if (p.active[l * p.M + m]) merge(columns[(l * p.B + i) * p.M + m], stats.columns[i * p.M + m]);
        });
      }
    }
  });

  // Serial, fixed-order means over the queries.
  at::Tensor losses = at::zeros({p.L, p.M}, opts);
  at::Tensor dscale = at::zeros({kScaleGrad ? p.L : 0, p.M}, opts);
  for (int64_t l = 0; l < p.L; ++l) {
    for (int64_t m = 0; m < p.M; ++m) {
      if (!p.active[l * p.M + m]) continue;
      T row_total = 0, column_total = 0, row_dscale_total = 0, column_dscale_total = 0;
      for (int64_t i = 0; i < p.B; ++i) {
        const int64_t at = (l * p.B + i) * p.M + m;
        const T positive_logit_i = positive_logit[at];
        row_total += (row_max_ptr[at] - positive_logit_i) + row_logsum_ptr[at];
        if constexpr (kScaleGrad) row_dscale_total += row_dscale[at];
        if (!symmetric) continue;
        const SoftmaxStats<T>& column = columns[at];
        col_max_ptr[at] = column.max;
        col_logsum_ptr[at] = std::log(column.sum);
        column_total += (column.max - positive_logit_i) + col_logsum_ptr[at];
        if constexpr (kScaleGrad) column_dscale_total += column.cos_sum / column.sum - positive_cos[at];
      }
      losses.data_ptr<T>()[l * p.M + m] = (symmetric ? (row_total + column_total) / 2 : row_total) / p.B;
      if constexpr (kScaleGrad)
        dscale.data_ptr<T>()[l * p.M + m] =
            (symmetric ? (row_dscale_total + column_dscale_total) / 2 : row_dscale_total) / p.B;
    }
  }
  return {losses, row_max, row_logsum, col_max, col_logsum, dscale};
}

// ---------------------------------------------------------------- backward

// W_m = coef * G_m * rq * rk for one tile, into w; writes rowsum(coef * G_m * cos_m) into
// gc_row and adds the column sums to gc_col. G_m = softmax_row - onehot(p) (+ softmax_column
// - onehot for the positive columns), softmax = exp((z - max) - logsum) with the forward's z.
template <typename T>
void gradient_tile(const Problem<T>& p, int64_t l, int64_t m, int64_t r0, int64_t nr, int64_t c0, int64_t nc,
                   const T* s, T* w, T* rk, T coef, const T* row_max, const T* row_logsum, const T* col_max,
                   const T* col_logsum, T* gc_row, T* gc_col) {
  const T* inv_k = p.inv_k + (l * p.N + c0) * p.M + m;
  for (int64_t j = 0; j < nc; ++j) rk[j] = inv_k[j * p.M];
  for (int64_t i = 0; i < nr; ++i) {
    const int64_t at = (l * p.B + r0 + i) * p.M + m;
    const T row_scale = p.scale * p.inv_q[at];
    const T max = row_max[at], logsum = row_logsum[at];
    const T* s_row = s + i * nc;
    T* w_row = w + i * nc;
#pragma omp simd
    for (int64_t j = 0; j < nc; ++j) w_row[j] = vector_exp((p.logit(row_scale, s_row[j], rk[j]) - max) - logsum);
    const int64_t pos = p.positive[r0 + i] - c0;
    if (pos >= 0 && pos < nc) w_row[pos] -= 1;
  }
  if (p.symmetric) {
    for (int64_t e = p.positives_begin(c0), end = p.positives_begin(c0 + nc); e < end; ++e) {
      const int64_t j = p.positive_sorted[e] - c0, column_query = p.queries_by_positive[e];
      const int64_t at = (l * p.B + column_query) * p.M + m;
      const T max = col_max[at], logsum = col_logsum[at];
      for (int64_t i = 0; i < nr; ++i) {
        const T z = p.logit(p.scale * p.inv_q[(l * p.B + r0 + i) * p.M + m], s[i * nc + j], rk[j]);
        w[i * nc + j] += vector_exp((z - max) - logsum) - (r0 + i == column_query ? T(1) : T(0));
      }
    }
  }
  for (int64_t i = 0; i < nr; ++i) {
    const T rq = p.inv_q[(l * p.B + r0 + i) * p.M + m];
    const T* s_row = s + i * nc;
    T* w_row = w + i * nc;
    T row_sum = 0;
#pragma omp simd reduction(+ : row_sum)
    for (int64_t j = 0; j < nc; ++j) {
      const T g = coef * w_row[j];
      const T g_cos = g * rq * s_row[j] * rk[j];
      row_sum += g_cos;
      gc_col[j] += g_cos;
      w_row[j] = g * rq * rk[j];
    }
    gc_row[i] = row_sum;
  }
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

// Parallel over (layer, column tile): each task owns its rows of dK and adds its dQ rows
// into the shared dQ in turn (column tile 0 first), one row block at a time.
template <typename T>
std::vector<at::Tensor> backward_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& inv_q,
                                      const at::Tensor& inv_k, const at::Tensor& norm_grad_q,
                                      const at::Tensor& norm_grad_k, const at::Tensor& positive,
                                      const std::vector<int64_t>& dims, const at::Tensor& active, double scale,
                                      bool symmetric, const at::Tensor& row_max, const at::Tensor& row_logsum,
                                      const at::Tensor& col_max, const at::Tensor& col_logsum, const at::Tensor& coef,
                                      int64_t n_threads) {
  const Problem<T> p = make_problem<T>(q, k, inv_q, inv_k, positive, dims, active, scale, symmetric);
  at::Tensor grad_q = at::zeros_like(q);
  at::Tensor grad_k = at::zeros_like(k);
  std::vector<T> gc_row(p.L * p.M * p.B, 0);  // [L, M, B]: rowsum(coef * G_m * cos_m)
  const T* coef_ptr = coef.data_ptr<T>();
  const T* row_max_ptr = row_max.data_ptr<T>();
  const T* row_logsum_ptr = row_logsum.data_ptr<T>();
  const T* col_max_ptr = symmetric ? col_max.data_ptr<T>() : nullptr;
  const T* col_logsum_ptr = symmetric ? col_logsum.data_ptr<T>() : nullptr;
  T* grad_q_ptr = grad_q.data_ptr<T>();
  T* grad_k_ptr = grad_k.data_ptr<T>();
  Turns turns(p.L * p.n_blocks);  // dQ row block (l, r) takes column tiles in order

  run_tasks(threads_for(p.L * p.B * p.N * p.D, p.L * p.n_tiles, n_threads), [&] {
    const int64_t tile_size = kRowBlock * p.col_tile;
    Scratch<T> s(tile_size), w(p.M * tile_size), rk(p.col_tile), dq(kRowBlock * p.D), gc_block(p.M * kRowBlock);
    std::vector<T> gc_col;
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < p.L * p.n_tiles; ++task) {
      const int64_t l = task / p.n_tiles, tile = task % p.n_tiles, last = p.last[l];
      if (last < 0) continue;
      const int64_t c0 = tile * p.col_tile, nc = std::min(p.col_tile, p.N - c0);
      T* dk = grad_k_ptr + (l * p.N + c0) * p.D;
      gc_col.assign(p.M * nc, 0);
      for (int64_t block = 0; block < p.n_blocks; ++block) {
        const int64_t r0 = block * kRowBlock, nr = std::min(kRowBlock, p.B - r0);
        for (int64_t m = 0; m <= last; ++m) {
          accumulate_segment(p, l, m, r0, nr, c0, nc, s.get());
          if (p.active[l * p.M + m])
            gradient_tile(p, l, m, r0, nr, c0, nc, s.get(), w.get() + m * nr * nc, rk.get(), coef_ptr[l * p.M + m],
                          row_max_ptr, row_logsum_ptr, col_max_ptr, col_logsum_ptr, gc_block.get() + m * nr,
                          gc_col.data() + m * nc);
        }
        // Walk the segments from the largest dim down; w[last] accumulates H_s.
        T* h = w.get() + last * nr * nc;
        auto h_view = view(h, nr, nc, nc);
        for (int64_t m = last; m >= 0; --m) {
          if (m < last && p.active[l * p.M + m]) {
            const T* w_m = w.get() + m * nr * nc;
#pragma omp simd
            for (int64_t e = 0; e < nr * nc; ++e) h[e] += w_m[e];
          }
          const int64_t a = p.starts[m], width = p.ends[m] - a;
          auto dq_seg = view(dq.get() + a, nr, width, p.D);
          at::mm_out(dq_seg, h_view, view(p.k + (l * p.N + c0) * p.D + a, nc, width, p.D));
          view(dk + a, nc, width, p.D).addmm_(h_view.t(), view(p.q + (l * p.B + r0) * p.D + a, nr, width, p.D));
        }
        turns.run_in_turn(l * p.n_blocks + block, tile, [&] {
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
      subtract_norm_term(p, last, nc, norm_grad_k.data_ptr<T>() + (l * p.N + c0) * p.M, gc_col.data(), nc,
                         p.k + (l * p.N + c0) * p.D, dk);
    }
    // The implicit barrier above completes every dQ sum; now its norm term, per row block.
#pragma omp for schedule(static)
    for (int64_t task = 0; task < p.L * p.n_blocks; ++task) {
      const int64_t l = task / p.n_blocks, r0 = task % p.n_blocks * kRowBlock, nr = std::min(kRowBlock, p.B - r0);
      if (p.last[l] < 0) continue;
      subtract_norm_term(p, p.last[l], nr, norm_grad_q.data_ptr<T>() + (l * p.B + r0) * p.M,
                         gc_row.data() + l * p.M * p.B + r0, p.B, p.q + (l * p.B + r0) * p.D,
                         grad_q_ptr + (l * p.B + r0) * p.D);
    }
  });
  return {grad_q, grad_k};
}

void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& positive) {
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu(), "m2d cpp backend: tensors must be on the CPU");
  TORCH_CHECK(q.is_contiguous() && k.is_contiguous(), "m2d cpp backend: queries and docs must be contiguous");
  TORCH_CHECK(q.scalar_type() == k.scalar_type(), "m2d cpp backend: queries and docs must share a dtype");
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kDouble,
              "m2d cpp backend: expects float32 or float64 (convert low precision first)");
  TORCH_CHECK(positive.scalar_type() == at::kLong && positive.is_contiguous() && positive.dim() == 1 &&
                  positive.size(0) == q.size(1),
              "m2d cpp backend: positive_index must be a contiguous int64 tensor of shape [B]");
}

}  // namespace

std::vector<at::Tensor> m2d_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& inv_q,
                                    const at::Tensor& inv_k, const at::Tensor& positive, std::vector<int64_t> dims,
                                    const at::Tensor& active, double scale, bool symmetric, bool scale_grad,
                                    int64_t n_threads) {
  check_inputs(q, k, positive);
  if (q.scalar_type() == at::kDouble)
    return scale_grad ? forward_impl<double, true>(q, k, inv_q, inv_k, positive, dims, active, scale, symmetric, n_threads)
                      : forward_impl<double, false>(q, k, inv_q, inv_k, positive, dims, active, scale, symmetric, n_threads);
  return scale_grad ? forward_impl<float, true>(q, k, inv_q, inv_k, positive, dims, active, scale, symmetric, n_threads)
                    : forward_impl<float, false>(q, k, inv_q, inv_k, positive, dims, active, scale, symmetric, n_threads);
}

std::vector<at::Tensor> m2d_backward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& inv_q,
                                     const at::Tensor& inv_k, const at::Tensor& norm_grad_q,
                                     const at::Tensor& norm_grad_k, const at::Tensor& positive,
                                     std::vector<int64_t> dims, const at::Tensor& active, double scale, bool symmetric,
                                     const at::Tensor& row_max, const at::Tensor& row_logsum, const at::Tensor& col_max,
                                     const at::Tensor& col_logsum, const at::Tensor& coef, int64_t n_threads) {
  check_inputs(q, k, positive);
  if (q.scalar_type() == at::kDouble)
    return backward_impl<double>(q, k, inv_q, inv_k, norm_grad_q, norm_grad_k, positive, dims, active, scale,
                                 symmetric, row_max, row_logsum, col_max, col_logsum, coef, n_threads);
  return backward_impl<float>(q, k, inv_q, inv_k, norm_grad_q, norm_grad_k, positive, dims, active, scale, symmetric,
                              row_max, row_logsum, col_max, col_logsum, coef, n_threads);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.doc() = "m2d-kernels: fused 2D Matryoshka InfoNCE for CPU tensors (OpenMP)";
  module.def("forward", &m2d_forward,
             "(queries, docs, inv_q, inv_k, positive_index, dims, active, scale, symmetric, scale_grad, n_threads) -> "
             "(losses [L, M], row_max, row_logsum [L, B, M], col_max, col_logsum [L, B, M] or empty, "
             "dloss_dscale [L, M] or empty)");
  module.def("backward", &m2d_backward,
             "(queries, docs, inv_q, inv_k, norm_grad_q, norm_grad_k, positive_index, dims, active, scale, "
             "symmetric, row_max, row_logsum, col_max, col_logsum, coef [L, M], n_threads) -> (grad_queries, grad_docs)");
}
