// Flash-style attention on CPU (Dao et al., FlashAttention-2, Algorithms 1 and 2).
//
// Forward, one task per (batch*head, block of kBlockQ queries): for each block of kBlockK
// keys, S = (scale Q) K^T for the tile, online softmax (running row max m and row sum l,
// rescaling the accumulator by exp(m_old - m_new)), O += P V. Only one kBlockQ x kBlockK
// tile of scores lives per thread. The log-sum-exp m + log l is saved for backward.
//
// Backward, one task per (batch*head): for each key block j, for each query block i,
// recompute P = exp(S - lse), then
//   dV_j += P^T dO_i,  dP = dO_i V_j^T,  dS = P * (dP - Delta_i),  Delta_i = rowsum(dO_i * O_i)
//   dQ_i += scale dS K_j,  dK_j += scale dS^T Q_i
// dQ of the whole head stays in the task's scratch, so no two threads write the same row.
//
// Data are copied tile by tile into fp32 scratch padded to the compile-time head dim kD
// (8, 16, 32, 64, 128 or 256; zero padding leaves every product unchanged), keys also
// transposed, so every inner loop runs over a compile-time length with unit stride:
//   score tile:  acc[r][key] += q[r][d] * kt[d][key]   (4 query rows per pass, keys innermost)
//   row updates: acc[d]      += p[key]  * v[key][d]    (head dim innermost)
#include "cpu/attention.h"

// Finite math for this file only (as in group_norm_silu.cpp): the exp clamps of the
// softmax become vmaxps/vminps. The kernels' own values are finite: the running max starts at
// kLowest (the lowest finite float, below every real score) and padding rows use -kNoScore,
// finite sentinels whose exp underflows to 0. Inputs may not be: a NaN or +inf score is found
// by a bit test (integer arithmetic, which finite-math-only cannot assume away) and makes its
// row NaN, as in the exact softmax; a -inf score has probability 0, as there.
#pragma GCC optimize("finite-math-only", "no-signed-zeros")

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "cpu/group_norm_silu.h"  // bf16 conversion and exp_approx
#include "cpu/parallel.h"

namespace fastdiff {
namespace {

constexpr int kBlockQ = 64;  // query rows per tile
constexpr int kBlockK = 64;  // keys per tile
constexpr float kNoScore = -1e30f;  // backward padding rows: lse = -kNoScore, so exp(s - lse) = 0
constexpr float kLowest = -3.40282347e38f;  // forward running max start: the lowest finite float

// 1 if x is NaN or +inf (either makes the exact softmax of its row NaN), else 0; bits only.
inline int nan_or_pos_inf(float x) {
  const uint32_t u = float_to_bits(x);
  return static_cast<int>(((u & 0x7FFFFFFFu) > 0x7F800000u) | (u == 0x7F800000u));
}

// Per-thread scratch, grown on demand and reused across tasks and calls.
float* scratch(std::size_t floats) {
  static thread_local std::vector<float> buffer;
  if (buffer.size() < floats) buffer.resize(floats);
  return buffer.data();
}

// rows (n x D, row stride `stride`) -> dst (kBlock x kD), scaled, zero padded.
template <typename T, int kD>
void load_rows(const T* src, int64_t stride, int64_t n, int64_t D, float scale, int rows, float* dst) {
  for (int64_t r = 0; r < n; ++r) {
    const T* s = src + r * stride;
    float* d = dst + r * kD;
    for (int64_t c = 0; c < D; ++c) d[c] = load_value(s, c) * scale;
    for (int64_t c = D; c < kD; ++c) d[c] = 0.0f;
  }
  std::fill(dst + n * kD, dst + int64_t(rows) * kD, 0.0f);
}

// rows (n x D) -> dst (kD x kWidth), transposed, scaled, zero padded.
template <typename T, int kD, int kWidth = kBlockK>
void load_rows_transposed(const T* src, int64_t stride, int64_t n, int64_t D, float* dst, float scale = 1.0f) {
  if (n < kWidth || D < kD) std::fill(dst, dst + kD * kWidth, 0.0f);
  for (int64_t r = 0; r < n; ++r) {
    const T* s = src + r * stride;
    for (int64_t c = 0; c < D; ++c) dst[c * kWidth + r] = load_value(s, c) * scale;
  }
}

// A (kBlockK x kD) block of rows for the kernels: the tensor itself when it is fp32 with
// rows of exactly kD and the block is full, otherwise a zero-padded fp32 copy in `buf`.
template <typename T, int kD>
const float* block_rows(const T* src, int64_t stride, int64_t n, int64_t D, float* buf) {
  if (std::is_same<T, float>::value && D == kD && stride == kD && n == kBlockK)
    return reinterpret_cast<const float*>(src);
  load_rows<T, kD>(src, stride, n, D, 1.0f, kBlockK, buf);
  return buf;
}

// C (M x W) (+)= A (M x K) * B (K x W), all compile-time sizes, fp32 scratch tiles.
// A(r, k) is read at a[r * kAr + k * kAk], so a transposed operand (P^T, dS^T) costs nothing:
// its elements are only ever broadcast. B and C rows are dense with strides kLdb, kLdc.
// The register tile is kRows x kCols accumulators (16 zmm): each vector of a B row feeds
// kRows FMAs. Measured on AVX-512 (GCC 12), one thread: 8 x 32 runs at 70-87 GFLOP/s
// for K >= 64, twice 4 x 64 (whose B loads bound it); 16 x 16 is best for short K.
template <int M, int K, int W, int kAr, int kAk, int kLdb, int kLdc, bool kAccumulate>
void gemm_tile(const float* __restrict a, const float* __restrict b, float* __restrict c) {
  constexpr int kColsMax = K <= 16 ? 16 : 32;
  constexpr int kCols = W < kColsMax ? W : kColsMax;
  constexpr int kRows = kCols >= 32 ? 8 : 16;
  static_assert(M % kRows == 0 && W % kCols == 0, "tile sizes must divide the block");
  for (int r0 = 0; r0 < M; r0 += kRows) {
    for (int w0 = 0; w0 < W; w0 += kCols) {
      float acc[kRows][kCols];
      for (int r = 0; r < kRows; ++r)
#pragma omp simd
        for (int w = 0; w < kCols; ++w) acc[r][w] = kAccumulate ? c[(r0 + r) * kLdc + w0 + w] : 0.0f;
      for (int k = 0; k < K; ++k) {
        const float* __restrict brow = b + k * kLdb + w0;
        for (int r = 0; r < kRows; ++r) {
          const float av = a[(r0 + r) * kAr + k * kAk];
#pragma omp simd
          for (int w = 0; w < kCols; ++w) acc[r][w] += av * brow[w];
        }
      }
      for (int r = 0; r < kRows; ++r)
#pragma omp simd
        for (int w = 0; w < kCols; ++w) c[(r0 + r) * kLdc + w0 + w] = acc[r][w];
    }
  }
}

// ---------------------------------------------------------------------------- forward
// The score tile is kept transposed, S^T = K (scale Q)^T (keys x queries), so the online
// softmax runs down the key axis with the query index innermost: row max, exp and row
// sum vectorise across 16 queries with no horizontal reductions, and K, V are used as
// stored (row-major) while Q is transposed once per task.
template <typename T, int kD>
void forward(const AttentionArgs& a) {
  const int64_t H = a.heads, Lq = a.len_q, Lk = a.len_k, D = a.head_dim;
  const int64_t q_blocks = (Lq + kBlockQ - 1) / kBlockQ;
  const T* q = static_cast<const T*>(a.q);
  const T* k = static_cast<const T*>(a.k);
  const T* v = static_cast<const T*>(a.v);
  T* out = static_cast<T*>(a.out);
  parallel_for(a.batch * H * q_blocks, a.num_threads, [&](int64_t task) {
    const int64_t bh = task / q_blocks, b = bh / H, h = bh % H;
    const int64_t q0 = (task % q_blocks) * kBlockQ, nq = std::min<int64_t>(kBlockQ, Lq - q0);
    float* qt = scratch(2 * kBlockQ * kD + 2 * kBlockK * kD + kBlockK * kBlockQ + 3 * kBlockQ);
    float* o = qt + kD * kBlockQ;      // (kBlockQ, kD) unnormalised output
    float* kbuf = o + kBlockQ * kD;    // (kBlockK, kD) keys, when not read in place
    float* vbuf = kbuf + kBlockK * kD;  // (kBlockK, kD) values, when not read in place
    float* st = vbuf + kBlockK * kD;   // (kBlockK, kBlockQ) scores, then probabilities
    float* m = st + kBlockK * kBlockQ;  // (kBlockQ,) running max
    float* l = m + kBlockQ;             // (kBlockQ,) running sum
    float* alpha = l + kBlockQ;         // (kBlockQ,) rescaling of the old accumulator
    load_rows_transposed<T, kD, kBlockQ>(q + b * a.q_stride[0] + h * a.q_stride[1] + q0 * a.q_stride[2],
                                         a.q_stride[2], nq, D, qt, a.scale);
    std::fill(o, o + kBlockQ * kD, 0.0f);
    std::fill(m, m + kBlockQ, kLowest);
    std::fill(l, l + kBlockQ, 0.0f);
    int poisoned[kBlockQ] = {0};  // rows with a NaN or +inf score
    const T* kb = k + b * a.k_stride[0] + h * a.k_stride[1];
    const T* vb = v + b * a.v_stride[0] + h * a.v_stride[1];
    for (int64_t k0 = 0; k0 < Lk; k0 += kBlockK) {
      const int64_t nk = std::min<int64_t>(kBlockK, Lk - k0);
      const float* ks = block_rows<T, kD>(kb + k0 * a.k_stride[2], a.k_stride[2], nk, D, kbuf);
      const float* vs = block_rows<T, kD>(vb + k0 * a.v_stride[2], a.v_stride[2], nk, D, vbuf);
      gemm_tile<kBlockK, kD, kBlockQ, kD, 1, kBlockQ, kBlockQ, false>(ks, qt, st);  // S^T
      float new_max[kBlockQ], row_sum[kBlockQ];
#pragma omp simd
      for (int i = 0; i < kBlockQ; ++i) {
        new_max[i] = m[i];
        row_sum[i] = 0.0f;
      }
      for (int64_t j = 0; j < nk; ++j) {
        const float* sj = st + j * kBlockQ;
#pragma omp simd
        for (int i = 0; i < kBlockQ; ++i) {
          new_max[i] = std::max(new_max[i], sj[i]);
          poisoned[i] |= nan_or_pos_inf(sj[i]);
        }
      }
#pragma omp simd
      for (int i = 0; i < kBlockQ; ++i) {
        alpha[i] = exp_approx(m[i] - new_max[i]);  // 0 on the first block (m = kLowest)
        m[i] = new_max[i];
      }
      for (int64_t j = 0; j < nk; ++j) {
        float* sj = st + j * kBlockQ;
#pragma omp simd
        for (int i = 0; i < kBlockQ; ++i) {
          const float p = exp_approx(sj[i] - new_max[i]);
          sj[i] = p;
          row_sum[i] += p;
        }
      }
      std::fill(st + nk * kBlockQ, st + kBlockK * kBlockQ, 0.0f);  // padding keys: p = 0
#pragma omp simd
      for (int i = 0; i < kBlockQ; ++i) l[i] = l[i] * alpha[i] + row_sum[i];
      for (int i = 0; i < kBlockQ; ++i) {
        float* oi = o + i * kD;
        const float ai = alpha[i];
#pragma omp simd
        for (int d = 0; d < kD; ++d) oi[d] *= ai;
      }
      // O += P V, P read through S^T (A(i, j) = st[j * kBlockQ + i]).
      gemm_tile<kBlockQ, kBlockK, kD, 1, kBlockQ, kD, kD, true>(st, vs, o);
    }
    T* ob = out + ((b * H + h) * Lq + q0) * D;
    float* lse = a.lse + (b * H + h) * Lq + q0;
    const float nan = bits_to_float(0x7FC00000u);
    for (int64_t i = 0; i < nq; ++i) {
      const float inv = 1.0f / l[i];
      for (int64_t d = 0; d < D; ++d) store_value(ob, i * D + d, poisoned[i] ? nan : o[i * kD + d] * inv);
      lse[i] = poisoned[i] ? nan : m[i] + std::log(l[i]);
    }
  });
}

// --------------------------------------------------------------------------- backward
template <typename T, int kD>
void backward(const AttentionBackwardArgs& a) {
  const int64_t H = a.heads, Lq = a.len_q, Lk = a.len_k, D = a.head_dim;
  const int64_t q_blocks = (Lq + kBlockQ - 1) / kBlockQ;
  const int64_t lq_pad = q_blocks * kBlockQ;
  const T* go = static_cast<const T*>(a.grad_out);
  const T* q = static_cast<const T*>(a.q);
  const T* k = static_cast<const T*>(a.k);
  const T* v = static_cast<const T*>(a.v);
  const T* out = static_cast<const T*>(a.out);
  T* gq = static_cast<T*>(a.grad_q);
  T* gk = static_cast<T*>(a.grad_k);
  T* gv = static_cast<T*>(a.grad_v);
  parallel_for(a.batch * H, a.num_threads, [&](int64_t bh) {
    const int64_t b = bh / H, h = bh % H;
    float* qs = scratch(3 * lq_pad * kD + 2 * lq_pad + 5 * kBlockK * kD + 2 * kBlockQ * kBlockK);
    float* dos = qs + lq_pad * kD;      // (lq_pad, kD) dO
    float* dq = dos + lq_pad * kD;      // (lq_pad, kD) dQ accumulator (without scale)
    float* lse = dq + lq_pad * kD;      // (lq_pad,) -kNoScore on padding rows: P = 0 there
    float* delta = lse + lq_pad;        // (lq_pad,) rowsum(dO * O)
    float* ks = delta + lq_pad;         // (kBlockK, kD) keys
    float* kt = ks + kBlockK * kD;      // (kD, kBlockK) keys, transposed
    float* vt = kt + kD * kBlockK;      // (kD, kBlockK) values, transposed
    float* dk = vt + kD * kBlockK;      // (kBlockK, kD)
    float* dv = dk + kBlockK * kD;      // (kBlockK, kD)
    float* p = dv + kBlockK * kD;       // (kBlockQ, kBlockK) probabilities
    float* ds = p + kBlockQ * kBlockK;  // (kBlockQ, kBlockK) dP, then dS
    load_rows<T, kD>(q + b * a.q_stride[0] + h * a.q_stride[1], a.q_stride[2], Lq, D, a.scale, int(lq_pad), qs);
    load_rows<T, kD>(go + b * a.grad_out_stride[0] + h * a.grad_out_stride[1], a.grad_out_stride[2], Lq, D,
                     1.0f, int(lq_pad), dos);
    std::fill(dq, dq + lq_pad * kD, 0.0f);
    const T* ob = out + (b * H + h) * Lq * D;
    for (int64_t i = 0; i < lq_pad; ++i) {
      if (i < Lq) {
        lse[i] = a.lse[(b * H + h) * Lq + i];
        float acc = 0.0f;
        for (int64_t d = 0; d < D; ++d) acc += dos[i * kD + d] * load_value(ob, i * D + d);
        delta[i] = acc;
      } else {
        lse[i] = -kNoScore;
        delta[i] = 0.0f;
      }
    }
    const T* kb = k + b * a.k_stride[0] + h * a.k_stride[1];
    const T* vb = v + b * a.v_stride[0] + h * a.v_stride[1];
    for (int64_t k0 = 0; k0 < Lk; k0 += kBlockK) {
      const int64_t nk = std::min<int64_t>(kBlockK, Lk - k0);
      load_rows<T, kD>(kb + k0 * a.k_stride[2], a.k_stride[2], nk, D, 1.0f, kBlockK, ks);
      load_rows_transposed<T, kD>(kb + k0 * a.k_stride[2], a.k_stride[2], nk, D, kt);
      load_rows_transposed<T, kD>(vb + k0 * a.v_stride[2], a.v_stride[2], nk, D, vt);
      std::fill(dk, dk + 2 * kBlockK * kD, 0.0f);  // dk and dv
      for (int64_t q0 = 0; q0 < lq_pad; q0 += kBlockQ) {
        const float* qi = qs + q0 * kD;
        const float* doi = dos + q0 * kD;
        gemm_tile<kBlockQ, kD, kBlockK, kD, 1, kBlockK, kBlockK, false>(qi, kt, p);    // S
        gemm_tile<kBlockQ, kD, kBlockK, kD, 1, kBlockK, kBlockK, false>(doi, vt, ds);  // dP = dO V^T
        for (int i = 0; i < kBlockQ; ++i) {
          const float lse_i = lse[q0 + i], delta_i = delta[q0 + i];
          float* pi = p + i * kBlockK;
          float* dsi = ds + i * kBlockK;
#pragma omp simd
          for (int j = 0; j < kBlockK; ++j) {
            const float pij = j < nk ? exp_approx(pi[j] - lse_i) : 0.0f;
            pi[j] = pij;
            dsi[j] = pij * (dsi[j] - delta_i);
          }
        }
        // Rows past Lq have P = dS = 0 (lse = -kNoScore there), so they add nothing.
        gemm_tile<kBlockK, kBlockQ, kD, 1, kBlockK, kD, kD, true>(p, doi, dv);   // dV += P^T dO
        gemm_tile<kBlockK, kBlockQ, kD, 1, kBlockK, kD, kD, true>(ds, qi, dk);   // dK += dS^T (scale Q)
        gemm_tile<kBlockQ, kBlockK, kD, kBlockK, 1, kD, kD, true>(ds, ks, dq + q0 * kD);  // dQ += dS K
      }
      // dK = scale dS^T Q: qs already carries the scale.
      T* gkb = gk + ((b * H + h) * Lk + k0) * D;
      T* gvb = gv + ((b * H + h) * Lk + k0) * D;
      for (int64_t j = 0; j < nk; ++j)
        for (int64_t d = 0; d < D; ++d) {
          store_value(gkb, j * D + d, dk[j * kD + d]);
          store_value(gvb, j * D + d, dv[j * kD + d]);
        }
    }
    T* gqb = gq + (b * H + h) * Lq * D;
    for (int64_t i = 0; i < Lq; ++i)
      for (int64_t d = 0; d < D; ++d) store_value(gqb, i * D + d, dq[i * kD + d] * a.scale);
  });
}

// Calls fn with the smallest compiled head dim that holds D (8 <= D <= 256).
template <typename T, typename Args, typename Fn>
void dispatch_head_dim(const Args& a, Fn&& fn) {
  if (a.head_dim <= 8) return fn(std::integral_constant<int, 8>{});
  if (a.head_dim <= 16) return fn(std::integral_constant<int, 16>{});
  if (a.head_dim <= 32) return fn(std::integral_constant<int, 32>{});
  if (a.head_dim <= 64) return fn(std::integral_constant<int, 64>{});
  if (a.head_dim <= 128) return fn(std::integral_constant<int, 128>{});
  return fn(std::integral_constant<int, 256>{});
}

template <typename T>
void forward_dtype(const AttentionArgs& a) {
  dispatch_head_dim<T>(a, [&](auto kd) { forward<T, decltype(kd)::value>(a); });
}

template <typename T>
void backward_dtype(const AttentionBackwardArgs& a) {
  dispatch_head_dim<T>(a, [&](auto kd) { backward<T, decltype(kd)::value>(a); });
}

}  // namespace

void attention_forward_cpu(const AttentionArgs& args) {
  if (args.dtype == kBFloat16) {
    forward_dtype<uint16_t>(args);
  } else {
    forward_dtype<float>(args);
  }
}

void attention_backward_cpu(const AttentionBackwardArgs& args) {
  if (args.dtype == kBFloat16) {
    backward_dtype<uint16_t>(args);
  } else {
    backward_dtype<float>(args);
  }
}

}  // namespace fastdiff
