// Fused 2D Matryoshka InfoNCE on the CPU: every (layer, nested dim) pair in one call.
//
// Math (DESIGN.md section 1), for layer l, nested dims d_1 < ... < d_M, segments
// seg_m = [d_{m-1}, d_m):
//
//   S_m       = S_{m-1} + Q[:, seg_m] K[:, seg_m]^T            one accumulator over D
//   cos_m     = diag(rq_m) S_m diag(rk_m)                       rq_m = 1 / max(|q[:d_m]|, eps)
//   row_lse_m = logsumexp_j(scale * cos_m(i, j))                online max over column tiles
//   loss_lm   = mean_i [row_lse_m(i) - scale * cos_m(i, p(i))]  (+ the column direction, halved)
//
// Backward, with G_m = dLoss/dcos_m and W_m = diag(rq_m) G_m diag(rk_m):
//
//   dQ[:, seg_s] = H_s K[:, seg_s] - alpha_s Q[:, seg_s]        H_s = sum_{m >= s} W_m
//   dK[:, seg_s] = H_s^T Q[:, seg_s] - beta_s K[:, seg_s]       alpha_s = sum_{m >= s} rq_m^2 rowsum(G_m cos_m)
//
// Work is split into tiles of kRowBlock queries x kColTile candidates; every tile product
// is an ATen GEMM into a per-thread buffer that stays in L2, followed by clean loops for
// the epilogue. No B x N matrix is ever allocated. Reductions across tiles run in a fixed
// order (per row block / per column tile, summed in index order), so results do not
// depend on the number of threads.

#include <torch/extension.h>

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace {

constexpr int64_t kRowBlock = 64;   // queries per tile
constexpr int64_t kColTile = 512;   // candidates per tile: kRowBlock x kColTile fp32 = 128 KiB
// Multiply-adds per thread below which waking another thread costs more than it saves.
constexpr int64_t kWorkPerThread = int64_t(1) << 22;

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

// Everything a tile needs, for one call. Pointers are into contiguous tensors.
template <typename T>
struct Problem {
  const T* q;        // [L, B, D]
  const T* k;        // [L, N, D]
  const T* inv_q;    // [L, B, M]  1 / max(|q[:d_m]|, eps)
  const T* inv_k;    // [L, N, M]
  const int64_t* positive;  // [B] row of docs holding query i's positive
  int64_t L, B, N, D, M;
  T scale;
  bool symmetric;
  std::vector<int64_t> starts, ends;  // segment m is [starts[m], ends[m])
  std::vector<uint8_t> active;        // [L, M]
  std::vector<int64_t> last;          // [L] largest active m, -1 if none
  // Queries sorted by the doc row of their positive: the columns of the doc->query direction.
  std::vector<int64_t> queries_by_positive, positive_sorted;

  int64_t positives_begin(int64_t col) const {
    return std::lower_bound(positive_sorted.begin(), positive_sorted.end(), col) - positive_sorted.begin();
  }
};

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
  p.scale = static_cast<T>(scale);
  p.symmetric = symmetric;
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

// Runs `tasks` (a body with an orphaned `omp for`) on `threads` threads. One thread opens no
// OpenMP region at all: ATen's GEMMs inside a one-thread region would start a nested thread
// team on every call (measured: 70 ms instead of 1 ms for a 16 x 16 problem).
template <typename Tasks>
void run_tasks(int64_t threads, const Tasks& tasks) {
  if (threads > 1) {
#pragma omp parallel num_threads(threads)
    tasks();
  } else {
    tasks();
  }
}

// A [rows, cols] view of caller-owned memory, for ATen's GEMM.
template <typename T>
at::Tensor view(T* data, int64_t rows, int64_t cols, int64_t row_stride) {
  return at::from_blob(data, {rows, cols}, {row_stride, 1}, at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value));
}

// s[nr, nc] (+)= Q[l, r0:, seg_m] K[l, c0:, seg_m]^T
template <typename T>
void accumulate_segment(const Problem<T>& p, int64_t l, int64_t m, int64_t r0, int64_t nr, int64_t c0, int64_t nc, T* s) {
  const int64_t a = p.starts[m], width = p.ends[m] - a;
  auto qs = view(const_cast<T*>(p.q) + (l * p.B + r0) * p.D + a, nr, width, p.D);
  auto ks = view(const_cast<T*>(p.k) + (l * p.N + c0) * p.D + a, nc, width, p.D);
  auto out = view(s, nr, nc, nc);
  if (m == 0) {
    at::mm_out(out, qs, ks.t());
  } else {
    out.addmm_(qs, ks.t());
  }
}

// ---------------------------------------------------------------- forward

// Per-row log-sum-exp of one tile of pair (l, m), plus the positive logits and, for the
// doc->query direction, each positive column's (max, sumexp) over this row block.
template <typename T>
struct RowStats {
  std::vector<T> max, sum, positive_logit;  // [M, nr]
};

// Because |cos| <= 1, `scale` bounds every logit: when exp(-2 * scale) is still a normal
// number, sum_j exp(logit - scale) is exact without a running maximum.
template <typename T>
bool fixed_max_is_exact(T scale) {
  return 2 * scale <= (sizeof(T) == sizeof(float) ? T(80) : T(700));
}

template <typename T>
void forward_epilogue(const Problem<T>& p, int64_t l, int64_t m, int64_t r0, int64_t nr, int64_t c0, int64_t nc,
                      const T* s, T* rk, RowStats<T>& stats, T* column_max, T* column_sum) {
  const T* inv_k = p.inv_k + (l * p.N + c0) * p.M + m;
  const T* inv_q = p.inv_q + (l * p.B + r0) * p.M + m;
  for (int64_t j = 0; j < nc; ++j) rk[j] = inv_k[j * p.M];
  const bool fixed_max = fixed_max_is_exact(p.scale);
  for (int64_t i = 0; i < nr; ++i) {
    const T row_scale = p.scale * inv_q[i * p.M];
    const T* s_row = s + i * nc;
    T& run_max = stats.max[m * nr + i];
    T& run_sum = stats.sum[m * nr + i];
    T new_max = p.scale;
    if (!fixed_max) {
      T tile_max = -std::numeric_limits<T>::infinity();
#pragma omp simd reduction(max : tile_max)
      for (int64_t j = 0; j < nc; ++j) tile_max = std::max(tile_max, row_scale * s_row[j] * rk[j]);
      new_max = std::max(run_max, tile_max);
    }
    T tile_sum = 0;
#pragma omp simd reduction(+ : tile_sum)
    for (int64_t j = 0; j < nc; ++j) tile_sum += vector_exp(row_scale * s_row[j] * rk[j] - new_max);
    run_sum = run_sum * vector_exp(run_max - new_max) + tile_sum;
    run_max = new_max;
    const int64_t pos = p.positive[r0 + i] - c0;
    if (pos >= 0 && pos < nc) stats.positive_logit[m * nr + i] = row_scale * s_row[pos] * rk[pos];
  }
  if (!p.symmetric) return;
  // Each query's positive lies in exactly one column tile, so these are written once.
  for (int64_t e = p.positives_begin(c0), end = p.positives_begin(c0 + nc); e < end; ++e) {
    const int64_t j = p.positive_sorted[e] - c0;
    T col_max = -std::numeric_limits<T>::infinity();
    for (int64_t i = 0; i < nr; ++i) col_max = std::max(col_max, p.scale * inv_q[i * p.M] * s[i * nc + j] * rk[j]);
    T col_sum = 0;
    for (int64_t i = 0; i < nr; ++i) col_sum += vector_exp(p.scale * inv_q[i * p.M] * s[i * nc + j] * rk[j] - col_max);
    column_max[p.queries_by_positive[e] * p.M + m] = col_max;
    column_sum[p.queries_by_positive[e] * p.M + m] = col_sum;
  }
}

template <typename T>
std::vector<at::Tensor> forward_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& inv_q,
                                     const at::Tensor& inv_k, const at::Tensor& positive,
                                     const std::vector<int64_t>& dims, const at::Tensor& active, double scale,
                                     bool symmetric, int64_t n_threads) {
  const Problem<T> p = make_problem<T>(q, k, inv_q, inv_k, positive, dims, active, scale, symmetric);
  const int64_t n_blocks = (p.B + kRowBlock - 1) / kRowBlock;
  auto opts = q.options();
  at::Tensor row_lse = at::zeros({p.L, p.B, p.M}, opts);
  at::Tensor positive_logit = at::zeros({p.L, p.B, p.M}, opts);
  // Doc->query direction: per row block partial (max, sumexp) of each positive column.
  at::Tensor column_max = at::empty({symmetric ? p.L * n_blocks : 0, p.B, p.M}, opts);
  at::Tensor column_sum = at::empty({symmetric ? p.L * n_blocks : 0, p.B, p.M}, opts);
  T* row_lse_ptr = row_lse.data_ptr<T>();
  T* positive_logit_ptr = positive_logit.data_ptr<T>();
  T* column_max_ptr = column_max.data_ptr<T>();
  T* column_sum_ptr = column_sum.data_ptr<T>();

  run_tasks(threads_for(p.L * p.B * p.N * p.D, p.L * n_blocks, n_threads), [&] {
    std::vector<T> s(kRowBlock * kColTile), rk(kColTile);
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < p.L * n_blocks; ++task) {
      const int64_t l = task / n_blocks, block = task % n_blocks;
      const int64_t r0 = block * kRowBlock, nr = std::min(kRowBlock, p.B - r0);
      if (p.last[l] < 0) continue;
      RowStats<T> stats;
      // The fixed maximum, or -inf for the running one.
      stats.max.assign(p.M * nr, fixed_max_is_exact(p.scale) ? p.scale : -std::numeric_limits<T>::infinity());
      stats.sum.assign(p.M * nr, 0);
      stats.positive_logit.assign(p.M * nr, 0);
      T* block_column_max = column_max_ptr + task * p.B * p.M;
      T* block_column_sum = column_sum_ptr + task * p.B * p.M;
      for (int64_t c0 = 0; c0 < p.N; c0 += kColTile) {
        const int64_t nc = std::min(kColTile, p.N - c0);
        for (int64_t m = 0; m <= p.last[l]; ++m) {
          accumulate_segment(p, l, m, r0, nr, c0, nc, s.data());
          if (p.active[l * p.M + m])
            forward_epilogue(p, l, m, r0, nr, c0, nc, s.data(), rk.data(), stats, block_column_max,
                             block_column_sum);
        }
      }
      for (int64_t m = 0; m <= p.last[l]; ++m) {
        if (!p.active[l * p.M + m]) continue;
        for (int64_t i = 0; i < nr; ++i) {
          const int64_t at = (l * p.B + r0 + i) * p.M + m;
          row_lse_ptr[at] = stats.max[m * nr + i] + std::log(stats.sum[m * nr + i]);
          positive_logit_ptr[at] = stats.positive_logit[m * nr + i];
        }
      }
    }
  });

  // Serial, fixed-order reductions over rows (and over row blocks for the column LSE).
  at::Tensor losses = at::zeros({p.L, p.M}, opts);
  at::Tensor col_lse = at::zeros({symmetric ? p.L : 0, p.B, p.M}, opts);
  T* losses_ptr = losses.data_ptr<T>();
  T* col_lse_ptr = col_lse.data_ptr<T>();
  for (int64_t l = 0; l < p.L; ++l) {
    for (int64_t m = 0; m < p.M; ++m) {
      if (!p.active[l * p.M + m]) continue;
      T row_total = 0, column_total = 0;
      for (int64_t i = 0; i < p.B; ++i) {
        const int64_t at = (l * p.B + i) * p.M + m;
        row_total += row_lse_ptr[at] - positive_logit_ptr[at];
        if (!symmetric) continue;
        // lse = max + log(sum_b sum_b * exp(max_b - max)), blocks in order.
        T max = -std::numeric_limits<T>::infinity(), sum = 0;
        for (int64_t block = 0; block < n_blocks; ++block)
          max = std::max(max, column_max_ptr[((l * n_blocks + block) * p.B + i) * p.M + m]);
        for (int64_t block = 0; block < n_blocks; ++block) {
          const int64_t part = ((l * n_blocks + block) * p.B + i) * p.M + m;
          sum += column_sum_ptr[part] * std::exp(column_max_ptr[part] - max);
        }
        col_lse_ptr[at] = max + std::log(sum);
        column_total += col_lse_ptr[at] - positive_logit_ptr[at];
      }
      losses_ptr[l * p.M + m] = (symmetric ? (row_total + column_total) / 2 : row_total) / p.B;
    }
  }
  return {losses, row_lse, col_lse};
}

// ---------------------------------------------------------------- backward

// W_m = coef * G_m * rq * rk for one tile, into w; adds rowsum/colsum of coef * G_m * cos_m.
// G_m = softmax_row - onehot(p) (+ softmax_column - onehot for the positive columns).
template <typename T>
void gradient_tile(const Problem<T>& p, int64_t l, int64_t m, int64_t r0, int64_t nr, int64_t c0, int64_t nc,
                   const T* s, T* w, T* rk, T coef, const T* row_lse, const T* col_lse, T* gc_row, T* gc_col) {
  const T* inv_k = p.inv_k + (l * p.N + c0) * p.M + m;
  for (int64_t j = 0; j < nc; ++j) rk[j] = inv_k[j * p.M];
  for (int64_t i = 0; i < nr; ++i) {
    const int64_t at = (l * p.B + r0 + i) * p.M + m;
    const T row_scale = p.scale * p.inv_q[at];
    const T lse = row_lse[at];
    const T* s_row = s + i * nc;
    T* w_row = w + i * nc;
#pragma omp simd
    for (int64_t j = 0; j < nc; ++j) w_row[j] = vector_exp(row_scale * s_row[j] * rk[j] - lse);
    const int64_t pos = p.positive[r0 + i] - c0;
    if (pos >= 0 && pos < nc) w_row[pos] -= 1;
  }
  if (p.symmetric) {
    for (int64_t e = p.positives_begin(c0), end = p.positives_begin(c0 + nc); e < end; ++e) {
      const int64_t j = p.positive_sorted[e] - c0, column_query = p.queries_by_positive[e];
      const T lse = col_lse[(l * p.B + column_query) * p.M + m];
      for (int64_t i = 0; i < nr; ++i) {
        const T logit = p.scale * p.inv_q[(l * p.B + r0 + i) * p.M + m] * s[i * nc + j] * rk[j];
        w[i * nc + j] += vector_exp(logit - lse) - (r0 + i == column_query ? T(1) : T(0));
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
    gc_row[i] += row_sum;
  }
}

// Subtracts the norm term: out[r, seg_s] -= (sum_{m >= s} a[r, m] * gc[m, r]) * x[r, seg_s].
template <typename T>
void subtract_norm_term(const Problem<T>& p, int64_t last, int64_t rows, const T* a, const T* gc, const T* x, T* out) {
  for (int64_t r = 0; r < rows; ++r) {
    T suffix = 0;
    for (int64_t m = last; m >= 0; --m) {
      suffix += a[r * p.M + m] * gc[m * rows + r];
      for (int64_t c = p.starts[m]; c < p.ends[m]; ++c) out[r * p.D + c] -= suffix * x[r * p.D + c];
    }
  }
}

// Parallel over (layer, column tile): each task owns its rows of dK and writes dQ
// contributions into a partial per column tile; the partials are summed in tile order.
template <typename T>
std::vector<at::Tensor> backward_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& inv_q,
                                      const at::Tensor& inv_k, const at::Tensor& norm_grad_q,
                                      const at::Tensor& norm_grad_k, const at::Tensor& positive,
                                      const std::vector<int64_t>& dims, const at::Tensor& active, double scale,
                                      bool symmetric, const at::Tensor& row_lse, const at::Tensor& col_lse,
                                      const at::Tensor& coef, int64_t n_threads) {
  const Problem<T> p = make_problem<T>(q, k, inv_q, inv_k, positive, dims, active, scale, symmetric);
  // At least 4 column tiles (the parallel tasks of a layer) when N allows, so small N still
  // uses every thread; the tiling depends on N only, keeping the sum order thread-independent.
  const int64_t col_tile = std::clamp<int64_t>((p.N / 4 + kRowBlock - 1) / kRowBlock * kRowBlock, kRowBlock, kColTile);
  const int64_t n_tiles = (p.N + col_tile - 1) / col_tile;
  auto opts = q.options();
  at::Tensor grad_q = at::zeros_like(q);
  at::Tensor grad_k = at::zeros_like(k);
  // One layer at a time keeps the dQ partials at n_tiles * B * D.
  at::Tensor grad_q_parts = at::empty({n_tiles, p.B, p.D}, opts);
  at::Tensor gc_row_parts = at::empty({n_tiles, p.M, p.B}, opts);
  const T* coef_ptr = coef.data_ptr<T>();
  const T* row_lse_ptr = row_lse.data_ptr<T>();
  const T* col_lse_ptr = symmetric ? col_lse.data_ptr<T>() : nullptr;
  T* grad_k_ptr = grad_k.data_ptr<T>();

  for (int64_t l = 0; l < p.L; ++l) {
    const int64_t last = p.last[l];
    if (last < 0) continue;
    grad_q_parts.zero_();
    gc_row_parts.zero_();
    run_tasks(threads_for(p.B * p.N * p.D, n_tiles, n_threads), [&] {
      std::vector<T> s(kRowBlock * kColTile), w((last + 1) * kRowBlock * kColTile), rk(kColTile);
      std::vector<T> gc_col;
#pragma omp for schedule(dynamic, 1)
      for (int64_t tile = 0; tile < n_tiles; ++tile) {
        const int64_t c0 = tile * col_tile, nc = std::min(col_tile, p.N - c0);
        T* dq = grad_q_parts.data_ptr<T>() + tile * p.B * p.D;
        T* gc_row = gc_row_parts.data_ptr<T>() + tile * p.M * p.B;
        T* dk = grad_k_ptr + (l * p.N + c0) * p.D;
        gc_col.assign(p.M * nc, 0);
        for (int64_t r0 = 0; r0 < p.B; r0 += kRowBlock) {
          const int64_t nr = std::min(kRowBlock, p.B - r0);
          const int64_t tile_size = nr * nc;
          for (int64_t m = 0; m <= last; ++m) {
            accumulate_segment(p, l, m, r0, nr, c0, nc, s.data());
            if (p.active[l * p.M + m])
              gradient_tile(p, l, m, r0, nr, c0, nc, s.data(), w.data() + m * tile_size, rk.data(),
                            coef_ptr[l * p.M + m], row_lse_ptr, col_lse_ptr, gc_row + m * p.B + r0,
                            gc_col.data() + m * nc);
          }
          // Walk the segments from the largest dim down; w[last] accumulates H_s.
          T* h = w.data() + last * tile_size;
          auto h_view = view(h, nr, nc, nc);
          for (int64_t m = last; m >= 0; --m) {
            if (m < last && p.active[l * p.M + m]) {
              const T* w_m = w.data() + m * tile_size;
#pragma omp simd
              for (int64_t e = 0; e < tile_size; ++e) h[e] += w_m[e];
            }
            const int64_t a = p.starts[m], width = p.ends[m] - a;
            view(dq + r0 * p.D + a, nr, width, p.D)
                .addmm_(h_view, view(const_cast<T*>(p.k) + (l * p.N + c0) * p.D + a, nc, width, p.D));
            view(dk + a, nc, width, p.D)
                .addmm_(h_view.t(), view(const_cast<T*>(p.q) + (l * p.B + r0) * p.D + a, nr, width, p.D));
          }
        }
        subtract_norm_term(p, last, nc, norm_grad_k.data_ptr<T>() + (l * p.N + c0) * p.M, gc_col.data(),
                           p.k + (l * p.N + c0) * p.D, dk);
      }
    });
    // Fixed order: tile 0 + tile 1 + ..., independent of the thread count.
    auto grad_q_layer = grad_q[l];
    auto gc_row = gc_row_parts[0].clone();
    grad_q_layer.copy_(grad_q_parts[0]);
    for (int64_t tile = 1; tile < n_tiles; ++tile) {
      grad_q_layer.add_(grad_q_parts[tile]);
      gc_row.add_(gc_row_parts[tile]);
    }
    subtract_norm_term(p, last, p.B, norm_grad_q.data_ptr<T>() + l * p.B * p.M, gc_row.data_ptr<T>(),
                       p.q + l * p.B * p.D, grad_q_layer.data_ptr<T>());
  }
  return {grad_q, grad_k};
}

void check_inputs(const at::Tensor& q, const at::Tensor& k) {
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu(), "m2d cpp backend: tensors must be on the CPU");
  TORCH_CHECK(q.is_contiguous() && k.is_contiguous(), "m2d cpp backend: queries and docs must be contiguous");
  TORCH_CHECK(q.scalar_type() == k.scalar_type(), "m2d cpp backend: queries and docs must share a dtype");
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kDouble,
              "m2d cpp backend: expects float32 or float64 (convert low precision first)");
}

}  // namespace

std::vector<at::Tensor> m2d_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& inv_q,
                                    const at::Tensor& inv_k, const at::Tensor& positive, std::vector<int64_t> dims,
                                    const at::Tensor& active, double scale, bool symmetric, int64_t n_threads) {
  check_inputs(q, k);
  if (q.scalar_type() == at::kDouble)
    return forward_impl<double>(q, k, inv_q, inv_k, positive, dims, active, scale, symmetric, n_threads);
  return forward_impl<float>(q, k, inv_q, inv_k, positive, dims, active, scale, symmetric, n_threads);
}

std::vector<at::Tensor> m2d_backward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& inv_q,
                                     const at::Tensor& inv_k, const at::Tensor& norm_grad_q,
                                     const at::Tensor& norm_grad_k, const at::Tensor& positive,
                                     std::vector<int64_t> dims, const at::Tensor& active, double scale, bool symmetric,
                                     const at::Tensor& row_lse, const at::Tensor& col_lse, const at::Tensor& coef,
                                     int64_t n_threads) {
  check_inputs(q, k);
  if (q.scalar_type() == at::kDouble)
    return backward_impl<double>(q, k, inv_q, inv_k, norm_grad_q, norm_grad_k, positive, dims, active, scale,
                                 symmetric, row_lse, col_lse, coef, n_threads);
  return backward_impl<float>(q, k, inv_q, inv_k, norm_grad_q, norm_grad_k, positive, dims, active, scale, symmetric,
                              row_lse, col_lse, coef, n_threads);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.doc() = "m2d-kernels: fused 2D Matryoshka InfoNCE for CPU tensors (OpenMP)";
  module.def("forward", &m2d_forward,
             "(queries, docs, inv_q, inv_k, positive_index, dims, active, scale, symmetric, n_threads) -> "
             "(losses [L, M], row_lse [L, B, M], col_lse [L, B, M] or empty)");
  module.def("backward", &m2d_backward,
             "(queries, docs, inv_q, inv_k, norm_grad_q, norm_grad_k, positive_index, dims, active, scale, "
             "symmetric, row_lse, col_lse, coef [L, M], n_threads) -> (grad_queries, grad_docs)");
}
