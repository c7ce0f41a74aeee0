// rpe_ops::rpe_attention / rpe_attention_backward: attention with iRPE logit terms in one CPU kernel.
//
//   logits[b,h,i,j] = scale * q[b,h,i] . k[b,h,j] + sum_t bias_t[b,h,i,j]
//   bias_t[b,h,i,j] = table_t[b,h,i,index_t[i,j]]          (a term on keys: rows looked up with the queries)
//                   = table_t[b,h,j,index_t[j,i]]          (a transposed term, on queries: looked up with the keys)
//   table_t[b,h]    = scale * x[b,h] @ weight_t[h]         (contextual: x = q on keys, k transposed; (Hw, d, nb))
//                   = weight_t[h] on every row             (bias: (Hw, nb));  Hw = 1 shares the weight across heads
//                   (+ attn_mask[b,h,i,j]: an optional additive mask, -inf at a masked key, broadcast over b, h, i)
//   P = softmax(logits),  lse[b,h,i] = logsumexp_j logits[b,h,i,j]  (a row with every key masked: P = 0, lse = -inf)
//   out[b,h,i] = sum_j P[b,h,i,j] * (v[b,h,j] + sum_u value_weight_u[h, value_index_u[i,j]])
//              = P @ v + sum_u S_u @ value_weight_u[h],  S_u[b,h,i,n] = sum_{j: value_index_u[i,j] = n} P[b,h,i,j]
//   (value terms: iRPE on values, contextual weights (Hw, nb, dv))
//
// Why a kernel: the bias is what makes iRPE cost more than plain attention. Materialised, it and the probabilities
// are (B, H, Lq, Lk) tensors streamed through memory several times per pass; PyTorch's fused CPU attention cannot
// give the gradient of a bias. Here one task owns one (b, h) pair: it computes that pair's small (L, nb) tables,
// then walks its query rows in blocks whose logits fit in the L2 cache: the bias is gathered from the tables
// straight into the block, BLAS adds the block's q k^T to it, softmax runs on it in place, and the backward
// recomputes the block from the saved log-sum-exp (as flash attention does), turns it into the logits' gradient in
// place and sums that into the tables' buckets before the block leaves the cache; the tables' gradients then give
// the weights' and q's or k's. A term on values needs the probabilities only through their per-row bucket sums
// S (L, nb): the forward sums each row of the block into S while it is in cache and adds S @ W_v; the backward adds
// (dO @ W_v^T)[bucket] to the probabilities' gradient and S^T dO to W_v's. Nothing (B, H, Lq, Lk), and no table, is
// ever allocated, and the op's inputs are the encodings' weights themselves.
// The matrix products are ATen's addmm on strided views of the raw matrices.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/zeros.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <c10/util/irange.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "rpe_ops.h"

// The element-wise loops are compiled three times on x86-64: for x86-64-v4 (AVX-512), x86-64-v3 (AVX2 with FMA) and
// the baseline, and each call takes the variant of the level that PyTorch's own CPU kernels use (`cpu_isa()`):
// the best the CPU supports, capped by ATEN_CPU_CAPABILITY=avx512|avx2|default. A wheel built on one machine still
// runs on an older one, and the tests run every variant the CPU supports (ATEN_CPU_CAPABILITY in a subprocess).
// Elsewhere the compiler's baseline vectorisation is used.
#if defined(__x86_64__) && defined(__GNUC__) && defined(__linux__)
#define RPE_OPS_X86_VARIANTS 1
#define RPE_OPS_TARGET_V3 __attribute__((target("avx2,fma,bmi,bmi2,lzcnt,movbe,f16c")))
#define RPE_OPS_TARGET_V4 \
  __attribute__((target("avx2,fma,bmi,bmi2,lzcnt,movbe,f16c,avx512f,avx512bw,avx512cd,avx512dq,avx512vl")))
#else
#define RPE_OPS_X86_VARIANTS 0
#endif

namespace rpe_ops {

CpuIsa cpu_isa() {
  static const CpuIsa isa = [] {
#if RPE_OPS_X86_VARIANTS
    const std::string aten = at::get_cpu_capability();  // "AVX512", "AVX2" or "DEFAULT", after ATEN_CPU_CAPABILITY
    __builtin_cpu_init();
    const bool v3 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                    __builtin_cpu_supports("bmi") && __builtin_cpu_supports("bmi2") &&
                    __builtin_cpu_supports("lzcnt") && __builtin_cpu_supports("movbe") && __builtin_cpu_supports("f16c");
    const bool v4 = v3 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                    __builtin_cpu_supports("avx512cd") && __builtin_cpu_supports("avx512dq") &&
                    __builtin_cpu_supports("avx512vl");
    if (aten == "AVX512" && v4) {
      return CpuIsa::kX86_64_V4;
    }
    if ((aten == "AVX512" || aten == "AVX2") && v3) {
      return CpuIsa::kX86_64_V3;
    }
#endif
    return CpuIsa::kBaseline;
  }();
  return isa;
}

const char* cpu_isa_name() {
  switch (cpu_isa()) {
    case CpuIsa::kX86_64_V4:
      return "x86-64-v4";
    case CpuIsa::kX86_64_V3:
      return "x86-64-v3";
    default:
      return "baseline";
  }
}

namespace {

// Defines `ret name params body` three times on x86-64 (name_v4, name_v3, name_baseline: the same code compiled for
// each level) and `name` itself, which calls the variant of cpu_isa(). `args` forwards the parameters.
#if RPE_OPS_X86_VARIANTS
#define RPE_OPS_VARIANTS(ret, name, params, args, ...) \
  RPE_OPS_TARGET_V4 ret name##_v4 params __VA_ARGS__   \
  RPE_OPS_TARGET_V3 ret name##_v3 params __VA_ARGS__   \
  ret name##_baseline params __VA_ARGS__               \
  ret name params {                                    \
    switch (cpu_isa()) {                               \
      case CpuIsa::kX86_64_V4:                         \
        return name##_v4 args;                         \
      case CpuIsa::kX86_64_V3:                         \
        return name##_v3 args;                         \
      default:                                         \
        return name##_baseline args;                   \
    }                                                  \
  }
#else
#define RPE_OPS_VARIANTS(ret, name, params, args, ...) ret name params __VA_ARGS__
#endif

// Rows of a block are chosen so that a block of logits holds about this many elements (256 KiB in float32).
constexpr int64_t kBlockElements = 65536;

// exp(x) for x <= 0 in float32, written so that loops over it vectorise: round(x / ln 2) by the 1.5 * 2^23 trick,
// a two-part ln 2, a degree-6 polynomial on |r| <= ln(2) / 2 (relative error below 2e-7) and the power of two built
// in the exponent bits. Inputs below -87 give 0 instead of a denormal (exp(-87) ~ 1.6e-38 is below float32 resolution
// of a probability, whose row sum is >= 1), so the masked keys' -inf gives exactly 0, as std::exp does. It pays: with
// std::exp (a library call per element, as neither it nor at::vec's exp vectorises in this build) a DeiT-S layer's
// forward+backward takes 1.18-1.24x the CPU time, about 3% of a train step (tools/BENCHMARKS.md). The tests check the
// kernel against the definition in float64, computed with ATen's exp.
inline float exp_nonpositive(float x) {
  const bool underflow = x < -87.0f;
  x = underflow ? -87.0f : x;
  constexpr float kMagic = 12582912.0f;  // 1.5 * 2^23
  const float shifted = x * 1.44269504088896341f + kMagic;
  const float n = shifted - kMagic;
  const float r = (x - n * 0.693145751953125f) - n * 1.428606765330187045e-06f;
  float p = 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  int32_t shifted_bits;
  std::memcpy(&shifted_bits, &shifted, sizeof(float));
  // the low mantissa bits of `shifted` hold n (two's complement, |n| < 2^22); 2^n as float bits is (n + 127) << 23
  const int32_t pow2_bits = (shifted_bits - 0x4B400000 + 127) << 23;
  float pow2;
  std::memcpy(&pow2, &pow2_bits, sizeof(float));
  return underflow ? 0.0f : p * pow2;
}

// One logit term as the kernels read it, for the current (b, h): the bias of logit (i, j) is
// rows[i * sr + ids[i * Lk + j]]. A term on keys has sr = nb (its (Lq x nb) table) or sr = 0 (a bias: the weight's
// row); a transposed term keeps its table transposed, (nb x Lk), with sr = 0 and ids[i * Lk + j] = index[j, i] * Lk
// + j: row by row its lookups then walk the keys forwards through at most nb table rows, as a term on keys does
// (reading the (Lk x nb) table instead costs a cache line per key). In the backward, grad (laid out as rows)
// receives the bucket sums of the logits' gradient.
template <typename scalar_t>
struct TermView {
  const scalar_t* rows;
  int64_t sr;
  const int32_t* ids;
  bool transposed;
  scalar_t* grad;
  int64_t nb;
};

// row[j] (+)= table[ids[j]] for one row (overwrite: row[j] = ...).
template <typename scalar_t>
inline void gather_row_impl(scalar_t* __restrict__ row, const scalar_t* __restrict__ table, int64_t Lk,
                            const int32_t* __restrict__ ids, bool overwrite) {
  if (overwrite) {
    for (int64_t j = 0; j < Lk; ++j) {
      row[j] = table[ids[j]];
    }
  } else {
    for (int64_t j = 0; j < Lk; ++j) {
      row[j] += table[ids[j]];
    }
  }
}
RPE_OPS_VARIANTS(void, gather_row, (float* row, const float* table, int64_t Lk, const int32_t* ids, bool overwrite),
                 (row, table, Lk, ids, overwrite), { gather_row_impl(row, table, Lk, ids, overwrite); })
void gather_row(double* row, const double* table, int64_t Lk, const int32_t* ids, bool overwrite) {
  gather_row_impl(row, table, Lk, ids, overwrite);
}

// row[j] (+)= (table[ids[j]] + table2[ids2[j]]): two terms in one pass.
template <typename scalar_t>
inline void gather_pair_impl(scalar_t* __restrict__ row, const scalar_t* __restrict__ table,
                             const int32_t* __restrict__ ids, const scalar_t* __restrict__ table2,
                             const int32_t* __restrict__ ids2, int64_t Lk, bool overwrite) {
  if (overwrite) {
    for (int64_t j = 0; j < Lk; ++j) {
      row[j] = table[ids[j]] + table2[ids2[j]];
    }
  } else {
    for (int64_t j = 0; j < Lk; ++j) {
      row[j] += table[ids[j]] + table2[ids2[j]];
    }
  }
}
RPE_OPS_VARIANTS(void, gather_pair_row,
                 (float* row, const float* table, const int32_t* ids, const float* table2, const int32_t* ids2,
                  int64_t Lk, bool overwrite),
                 (row, table, ids, table2, ids2, Lk, overwrite),
                 { gather_pair_impl(row, table, ids, table2, ids2, Lk, overwrite); })
void gather_pair_row(double* row, const double* table, const int32_t* ids, const double* table2, const int32_t* ids2,
                     int64_t Lk, bool overwrite) {
  gather_pair_impl(row, table, ids, table2, ids2, Lk, overwrite);
}

// Row reductions as OpenMP SIMD reductions (-fopenmp or -fopenmp-simd), which let the compiler keep partial results
// in vector lanes: float addition is not associative, so a plain `acc += x[j]` loop stays a serial chain, and GCC
// keeps a plain select reduction scalar, as it may not reorder selects that NaNs or signed zeros could tell apart
// (rows with a NaN give NaN outputs either way).
template <typename scalar_t>
inline scalar_t simd_sum(const scalar_t* __restrict__ x, int64_t n) {
  scalar_t sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < n; ++j) {
    sum += x[j];
  }
  return sum;
}

template <typename scalar_t>
inline scalar_t simd_max(const scalar_t* __restrict__ x, int64_t n) {
  scalar_t m = -std::numeric_limits<scalar_t>::infinity();
#pragma omp simd reduction(max : m)
  for (int64_t j = 0; j < n; ++j) {
    m = x[j] > m ? x[j] : m;
  }
  return m;
}

template <typename scalar_t>
inline scalar_t simd_dot(const scalar_t* __restrict__ x, const scalar_t* __restrict__ y, int64_t n) {
  scalar_t sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < n; ++j) {
    sum += x[j] * y[j];
  }
  return sum;
}

// row[j] = bias(i, j), the sum over the terms (n_terms >= 1) of a gather from one row of a term's table, or from its
// transposed table, two terms per pass. The block's product s q k^T is then added by BLAS (beta = 1), which spares
// BLAS its pass that zeroes the block for beta = 0 and this loop a load of the row.
template <typename scalar_t>
void set_bias_row(scalar_t* row, int64_t Lk, const TermView<scalar_t>* terms, int64_t n_terms, int64_t i) {
  for (int64_t t = 0; t < n_terms; t += 2) {
    const TermView<scalar_t>& a = terms[t];
    if (t + 1 < n_terms) {
      const TermView<scalar_t>& b = terms[t + 1];
      gather_pair_row(row, a.rows + i * a.sr, a.ids + i * Lk, b.rows + i * b.sr, b.ids + i * Lk, Lk, t == 0);
    } else {
      gather_row(row, a.rows + i * a.sr, Lk, a.ids + i * Lk, t == 0);
    }
  }
}

RPE_OPS_VARIANTS(float, row_max, (const float* row, int64_t n), (row, n), { return simd_max(row, n); })
double row_max(const double* row, int64_t n) { return simd_max(row, n); }

RPE_OPS_VARIANTS(float, row_dot, (const float* x, const float* y, int64_t n), (x, y, n), { return simd_dot(x, y, n); })
double row_dot(const double* x, const double* y, int64_t n) { return simd_dot(x, y, n); }

// row[j] = exp(row[j] - shift) (every row[j] <= shift); returns the sum.
RPE_OPS_VARIANTS(float, exp_shift_sum, (float* __restrict__ row, int64_t n, float shift), (row, n, shift), {
  for (int64_t j = 0; j < n; ++j) {
    row[j] = exp_nonpositive(row[j] - shift);
  }
  return simd_sum(row, n);
})

double exp_shift_sum(double* __restrict__ row, int64_t n, double shift) {
  for (int64_t j = 0; j < n; ++j) {
    row[j] = std::exp(row[j] - shift);
  }
  return simd_sum(row, n);
}

// grad[j] = prob[j] * (grad[j] - delta): the logits' gradient from the probabilities' gradient.
template <typename scalar_t>
inline void softmax_grad_row_impl(scalar_t* __restrict__ grad, const scalar_t* __restrict__ prob, int64_t n,
                                  scalar_t delta) {
  for (int64_t j = 0; j < n; ++j) {
    grad[j] = prob[j] * (grad[j] - delta);
  }
}
RPE_OPS_VARIANTS(void, softmax_grad_row, (float* grad, const float* prob, int64_t n, float delta),
                 (grad, prob, n, delta), { softmax_grad_row_impl(grad, prob, n, delta); })
void softmax_grad_row(double* grad, const double* prob, int64_t n, double delta) {
  softmax_grad_row_impl(grad, prob, n, delta);
}

template <typename scalar_t>
inline void scale_row_impl(scalar_t* __restrict__ row, int64_t n, scalar_t factor) {
  for (int64_t j = 0; j < n; ++j) {
    row[j] *= factor;
  }
}
RPE_OPS_VARIANTS(void, scale_row, (float* row, int64_t n, float factor), (row, n, factor),
                 { scale_row_impl(row, n, factor); })
void scale_row(double* row, int64_t n, double factor) { scale_row_impl(row, n, factor); }

// row[j] += mask[j]: a row of the additive attention mask.
template <typename scalar_t>
inline void add_row_impl(scalar_t* __restrict__ row, const scalar_t* __restrict__ mask, int64_t n) {
  for (int64_t j = 0; j < n; ++j) {
    row[j] += mask[j];
  }
}
RPE_OPS_VARIANTS(void, add_row, (float* row, const float* mask, int64_t n), (row, mask, n),
                 { add_row_impl(row, mask, n); })
void add_row(double* row, const double* mask, int64_t n) { add_row_impl(row, mask, n); }

// row[j] = exp(row[j] - shift) as exp_shift_sum, or 0 for every j when shift = -inf (a row whose keys are all masked:
// its logits are all -inf, and exp(-inf - (-inf)) would be NaN); returns the sum.
template <typename scalar_t>
scalar_t exp_shift_sum_masked(scalar_t* row, int64_t n, scalar_t shift) {
  if (shift == -std::numeric_limits<scalar_t>::infinity()) {
    std::fill(row, row + n, scalar_t(0));
    return 0;
  }
  return exp_shift_sum(row, n, shift);
}

// Scatter-adds go to kCopies interleaved copies of a row's buckets: neighbouring keys often share a bucket, and with
// a single copy their read-modify-writes would chain through memory (a store-to-load stall each).
constexpr int64_t kCopies = 4;

// out[n] (+)= the sum of the kCopies copies of bucket n in scratch (accumulate: add to out, else overwrite it).
template <typename scalar_t>
inline void reduce_copies(const scalar_t* __restrict__ scratch, int64_t nb, scalar_t* __restrict__ out,
                          bool accumulate) {
  for (int64_t n = 0; n < nb; ++n) {
    scalar_t sum = accumulate ? out[n] : scalar_t(0);
    for (int64_t c = 0; c < kCopies; ++c) {
      sum += scratch[c * nb + n];
    }
    out[n] = sum;
  }
}

// out[n] (+)= sum_{j: ix[j] = n} x[j] for n < nb (accumulate: add to out, else overwrite it); scratch holds
// kCopies * nb elements.
template <typename scalar_t>
inline void bucket_sum_one_row(const scalar_t* __restrict__ x, int64_t Lk, const int32_t* __restrict__ ix, int64_t nb,
                               scalar_t* __restrict__ scratch, scalar_t* __restrict__ out, bool accumulate) {
  std::fill(scratch, scratch + kCopies * nb, scalar_t(0));
  int64_t j = 0;
  for (; j + kCopies <= Lk; j += kCopies) {
    for (int64_t c = 0; c < kCopies; ++c) {
      scratch[c * nb + ix[j + c]] += x[j + c];
    }
  }
  for (; j < Lk; ++j) {
    scratch[ix[j]] += x[j];
  }
  reduce_copies(scratch, nb, out, accumulate);
}

// grad[ix[j]] += x[j]: a transposed term's bucket sums, row by row (its offsets of one row are distinct: no two
// updates meet).
template <typename scalar_t>
inline void scatter_add_row_impl(const scalar_t* __restrict__ x, int64_t Lk, const int32_t* __restrict__ ix,
                                 scalar_t* __restrict__ grad) {
  for (int64_t j = 0; j < Lk; ++j) {
    grad[ix[j]] += x[j];
  }
}
RPE_OPS_VARIANTS(void, scatter_add_row, (const float* x, int64_t Lk, const int32_t* ix, float* grad), (x, Lk, ix, grad),
                 { scatter_add_row_impl(x, Lk, ix, grad); })
void scatter_add_row(const double* x, int64_t Lk, const int32_t* ix, double* grad) {
  scatter_add_row_impl(x, Lk, ix, grad);
}

// Sums the logits' gradient of row i into the buckets of every term; scratch holds kCopies * nb elements.
template <typename scalar_t>
void bucket_sum_row(const scalar_t* __restrict__ g, int64_t Lk, const TermView<scalar_t>* terms, int64_t n_terms,
                    int64_t i, scalar_t* __restrict__ scratch) {
  for (int64_t t = 0; t < n_terms; ++t) {
    const TermView<scalar_t>& term = terms[t];
    if (term.transposed) {
      scatter_add_row(g, Lk, term.ids + i * Lk, term.grad);
    } else {
      bucket_sum_one_row(g, Lk, term.ids + i * Lk, term.nb, scratch, term.grad + i * term.nb, /*accumulate=*/true);
    }
  }
}

// A term on values in the backward, one pass over a row: dp[j] (+)= table[ix[j]] (the probabilities' gradient, before
// BLAS adds dO V^T to it; table = a row of dO @ W_v^T; the first value term overwrites dp) and out = the bucket sums
// of the probabilities p (as bucket_sum_one_row, overwriting out).
template <typename scalar_t>
inline void value_row_backward(scalar_t* __restrict__ dp, const scalar_t* __restrict__ p, int64_t Lk,
                               const scalar_t* __restrict__ table, const int32_t* __restrict__ ix, int64_t nb,
                               scalar_t* __restrict__ scratch, scalar_t* __restrict__ out, bool overwrite) {
  std::fill(scratch, scratch + kCopies * nb, scalar_t(0));
  int64_t j = 0;
  for (; j + kCopies <= Lk; j += kCopies) {
    for (int64_t c = 0; c < kCopies; ++c) {
      dp[j + c] = overwrite ? table[ix[j + c]] : dp[j + c] + table[ix[j + c]];
      scratch[c * nb + ix[j + c]] += p[j + c];
    }
  }
  for (; j < Lk; ++j) {
    dp[j] = overwrite ? table[ix[j]] : dp[j] + table[ix[j]];
    scratch[ix[j]] += p[j];
  }
  reduce_copies(scratch, nb, out, /*accumulate=*/false);
}

// c (m x n) = beta * c + alpha * op(a) @ op(b) on row-major matrices with row strides lda, ldb, ldc: op(a) is a
// (m x k) or, with ta, the transpose of a stored (k x m); likewise op(b) (k x n). With beta = 0, c is not read.
// ATen's addmm on strided views of the raw matrices, which calls the BLAS ATen was built with (MKL in the x86 wheels).
template <typename scalar_t>
void gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, scalar_t alpha, const scalar_t* a, int64_t lda,
          const scalar_t* b, int64_t ldb, scalar_t beta, scalar_t* c, int64_t ldc) {
  const auto options = at::TensorOptions().dtype(c10::CppTypeToScalarType<scalar_t>::value);
  auto view = [&](const scalar_t* p, int64_t rows, int64_t cols, int64_t ld, bool trans) {
    return at::from_blob(const_cast<scalar_t*>(p), {rows, cols},
                         trans ? at::IntArrayRef({1, ld}) : at::IntArrayRef({ld, 1}), options);
  };
  at::Tensor out = view(c, m, n, ldc, false);
  at::addmm_out(out, out, view(a, m, k, lda, ta), view(b, k, n, ldb, tb), beta, alpha);
}

int64_t block_rows(int64_t Lq, int64_t Lk) {
  return std::max<int64_t>(1, std::min<int64_t>(Lq, kBlockElements / std::max<int64_t>(Lk, 1)));
}

// q, k, v, ... as matrices of one (b, h): their last dim must be contiguous for the BLAS calls.
at::Tensor last_dim_contiguous(const at::Tensor& t) { return t.size(-1) <= 1 || t.stride(-1) == 1 ? t : t.contiguous(); }

// The (Lq x d)-style matrix of one (b, h) of a (B, H, L, d) tensor with a contiguous last dim.
template <typename scalar_t>
struct Mat {
  scalar_t* p;
  int64_t ld;
  scalar_t* row(int64_t r) const { return p + r * ld; }
};

template <typename scalar_t>
Mat<scalar_t> mat(const at::Tensor& t, int64_t b, int64_t h) {
  return {static_cast<scalar_t*>(t.data_ptr()) + b * t.stride(0) + h * t.stride(1), t.stride(2)};
}

// An additive attention mask as the kernels read it: the mask row of logit row i of (b, h) starts at
// p + b * sb + h * sh + i * si (stride 0 along a broadcast dim) and holds Lk contiguous values; p = nullptr: no mask.
template <typename scalar_t>
struct MaskView {
  const scalar_t* p = nullptr;
  int64_t sb = 0, sh = 0, si = 0;
  const scalar_t* row(int64_t b, int64_t h, int64_t i) const { return p + b * sb + h * sh + i * si; }
};

// The attention mask checked, its last dim made contiguous (undefined when there is none): an additive mask of the
// dtype of q, 4-D and broadcastable to (B, H, Lq, Lk) through size-1 dims (Lk itself not broadcast).
at::Tensor prepare_mask(const char* op, const std::optional<at::Tensor>& attn_mask, const at::Tensor& q,
                        const at::Tensor& k) {
  if (!attn_mask.has_value() || !attn_mask->defined()) {
    return {};
  }
  const at::Tensor& mask = *attn_mask;
  TORCH_CHECK(mask.device().is_cpu(), op, ": expected attn_mask on the CPU, got ", mask.device());
  TORCH_CHECK(mask.scalar_type() == q.scalar_type(), op, ": expected an additive attn_mask of the dtype of q (",
              q.scalar_type(), "), got ", mask.scalar_type(),
              " (turn a boolean mask into 0 and -inf, e.g. with masked_fill)");
  const int64_t B = q.size(0), H = q.size(1), Lq = q.size(2), Lk = k.size(2);
  TORCH_CHECK(mask.dim() == 4 && (mask.size(0) == 1 || mask.size(0) == B) &&
                  (mask.size(1) == 1 || mask.size(1) == H) && (mask.size(2) == 1 || mask.size(2) == Lq) &&
                  mask.size(3) == Lk,
              op, ": expected an attn_mask of shape (B or 1, H or 1, Lq or 1, Lk) = (", B, " or 1, ", H, " or 1, ", Lq,
              " or 1, ", Lk, "), got ", mask.sizes());
  return last_dim_contiguous(mask);
}

template <typename scalar_t>
MaskView<scalar_t> mask_view(const at::Tensor& mask) {
  if (!mask.defined()) {
    return {};
  }
  auto stride = [&](int64_t dim) { return mask.size(dim) == 1 ? 0 : mask.stride(dim); };
  return {mask.const_data_ptr<scalar_t>(), stride(0), stride(1), stride(2)};
}

void check_qkv(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"q", q}, {"k", k}, {"v", v}}) {
    TORCH_CHECK(t.device().is_cpu(), op, ": the fused kernel is CPU-only, got ", name, " on ", t.device(),
                " (use irpe.rpe_attention, which picks a path for the device)");
    TORCH_CHECK(t.dim() == 4, op, ": expected ", name, " of shape (B, H, L, d), got ", t.dim(), "-D ", name,
                " of shape ", t.sizes());
    TORCH_CHECK(t.scalar_type() == q.scalar_type(), op, ": expected q, k, v of one dtype, got ", q.scalar_type(),
                " and ", t.scalar_type(), " (", name, ")");
  }
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kDouble, op,
              ": expected float32 or float64 inputs, got ", q.scalar_type(), " (cast half types to float32 first)");
  TORCH_CHECK(q.size(0) == k.size(0) && q.size(1) == k.size(1) && q.size(3) == k.size(3), op,
              ": expected q (B, H, Lq, d) and k (B, H, Lk, d), got ", q.sizes(), " and ", k.sizes());
  TORCH_CHECK(v.size(0) == k.size(0) && v.size(1) == k.size(1) && v.size(2) == k.size(2), op,
              ": expected v (B, H, Lk, dv) with k (B, H, Lk, d), got ", v.sizes(), " and ", k.sizes());
}

// One logit term as the op receives it. Its weight is (Hw, nb) for a bias or (Hw, d, nb) for a contextual term,
// Hw = 1 (shared by the heads) or H; the rows of its table for (b, h) are weight[h] (bias) or
// scale * x[b, h] @ weight[h] (contextual; x = q for a term on keys, k for a transposed term).
struct TermSpec {
  const void* weight;
  int64_t Hw, d, nb, rows;  // rows = Lq (on keys) or Lk (transposed)
  bool contextual, transposed;
  const int32_t* ids;
  int64_t table_offset;  // of its table in a thread's workspace (contextual terms)
  int64_t grad_offset;   // of its table's gradient in a thread's workspace (backward)
  int64_t weight_offset;  // of its weight's gradient in a thread's accumulator (backward)
  int64_t head_stride() const { return Hw == 1 ? 0 : (contextual ? d * nb : nb); }
};

// One term on values as the op receives it: a contextual weight (Hw, nb, dv) and bucket ids (Lq, Lk); the output
// of (b, h) gets S @ weight[h], S (Lq, nb) the bucket sums of the probabilities' rows.
struct ValueSpec {
  const void* weight;
  int64_t Hw, nb, dv;
  const int32_t* ids;
  int64_t block_offset;   // of its (rows_per_block x nb) buffers in a thread's workspace, in units of rows_per_block
  int64_t weight_offset;  // of its weight's gradient in a thread's accumulator (backward), after the logit terms'
  int64_t head_stride() const { return Hw == 1 ? 0 : nb * dv; }
};

// Bucket ids as the kernels read them, range-checked in the same pass as the cast to int32 (separately, the check,
// the cast and the transposed copy took about 1 ms per term and call at L = 577). Returns false when an id lies
// outside [0, nb).
template <typename index_t>
inline bool narrow_ids_impl(const index_t* __restrict__ ids, int64_t n, int64_t nb, int32_t* __restrict__ out) {
  uint32_t bad = 0;
  for (int64_t t = 0; t < n; ++t) {
    const index_t id = ids[t];
    bad |= static_cast<uint32_t>(id < 0) | static_cast<uint32_t>(id >= nb);
    out[t] = static_cast<int32_t>(id);
  }
  return bad == 0;
}
RPE_OPS_VARIANTS(bool, narrow_ids, (const int64_t* ids, int64_t n, int64_t nb, int32_t* out), (ids, n, nb, out),
                 { return narrow_ids_impl(ids, n, nb, out); })
RPE_OPS_VARIANTS(bool, narrow_ids, (const int32_t* ids, int64_t n, int64_t nb, int32_t* out), (ids, n, nb, out),
                 { return narrow_ids_impl(ids, n, nb, out); })

// ids[i, j] = ids[i, j] * rows + j for rows [i0, i1) of the (cols x rows) transposed ids of a transposed term:
// offsets into its (nb x rows) table.
RPE_OPS_VARIANTS(void, add_key_offsets, (int32_t* __restrict__ ids, int64_t rows, int64_t i0, int64_t i1),
                 (ids, rows, i0, i1), {
                   for (int64_t i = i0; i < i1; ++i) {
                     int32_t* __restrict__ row = ids + i * rows;
                     for (int64_t j = 0; j < rows; ++j) {
                       row[j] = row[j] * static_cast<int32_t>(rows) + static_cast<int32_t>(j);
                     }
                   }
                 })

// Per-call passes over the ids (cast, offsets) run in parallel in pieces of about this many ids.
constexpr int64_t kIdsGrain = int64_t{1} << 15;

// Rows per piece of such a pass over ids with cols columns.
int64_t rows_grain(int64_t cols) { return std::max<int64_t>(1, kIdsGrain / std::max<int64_t>(cols, 1)); }

// The int32 ids of an ids tensor (rows x cols); an id outside [0, nb) raises check_index_range_cpu's error.
at::Tensor narrow_ids(const char* op, const at::Tensor& index, int64_t nb) {
  const at::Tensor idx = index.contiguous();
  at::Tensor out = at::empty(idx.sizes(), idx.options().dtype(at::kInt));
  int32_t* o = out.mutable_data_ptr<int32_t>();
  std::atomic<bool> ok{true};
  at::parallel_for(0, idx.numel(), kIdsGrain, [&](int64_t t0, int64_t t1) {
    const bool piece_ok = idx.scalar_type() == at::kLong
                              ? narrow_ids(idx.const_data_ptr<int64_t>() + t0, t1 - t0, nb, o + t0)
                              : narrow_ids(idx.const_data_ptr<int32_t>() + t0, t1 - t0, nb, o + t0);
    if (!piece_ok) {
      ok = false;
    }
  });
  if (!ok) {
    check_index_range_cpu(op, idx, nb);  // raises, saying which ids
    TORCH_CHECK(false, op, ": bucket ids must lie in [0, ", nb, ")");
  }
  return out;
}

// A transposed term's (cols x rows) table offsets, ids[j, i] * rows + j, from the int32 ids (rows x cols). The
// caller checks that rows * nb fits in int32.
at::Tensor transposed_offsets(const at::Tensor& ids) {
  at::Tensor offsets = ids.t().contiguous();  // ATen's blocked transpose
  const int64_t cols = offsets.size(0), rows = offsets.size(1);
  int32_t* o = offsets.mutable_data_ptr<int32_t>();
  at::parallel_for(0, cols, rows_grain(rows), [&](int64_t i0, int64_t i1) { add_key_offsets(o, rows, i0, i1); });
  return offsets;
}

// One ids tensor in the kernels' forms: the int32 ids and, built on first use, a transposed term's offsets. The terms
// of one call that pass the same ids tensor with the same nb share them: iRPE's encodings on queries, keys and
// values of a layer look up one ids tensor.
struct KernelIds {
  const c10::TensorImpl* source;
  int64_t nb;
  at::Tensor ids, offsets;

  const int32_t* transposed() {
    if (!offsets.defined()) {
      offsets = transposed_offsets(ids);
    }
    return offsets.const_data_ptr<int32_t>();
  }
};

// The terms, checked and brought to the kernels' form; owns the contiguous weights and the ids' forms.
struct Terms {
  std::vector<at::Tensor> weights;
  std::vector<KernelIds> ids;  // the specs point into their tensors' data, which stays put when the vector grows
  std::vector<TermSpec> specs;
  std::vector<ValueSpec> values;
  int64_t table_elements = 0, grad_elements = 0, weight_elements = 0, max_nb = 0;
  int64_t value_nb = 0;  // sum of the value terms' nb: a block's bucket sums take rows_per_block * value_nb
};

// The kernels' forms of an ids tensor with nb buckets: those of an earlier term of the call with the same tensor and
// nb, or new ones.
KernelIds& kernel_ids(const char* op, Terms& terms, const at::Tensor& index, int64_t nb) {
  for (KernelIds& ids : terms.ids) {
    if (ids.source == index.unsafeGetTensorImpl() && ids.nb == nb) {
      return ids;
    }
  }
  terms.ids.push_back(KernelIds{index.unsafeGetTensorImpl(), nb, narrow_ids(op, index, nb)});
  return terms.ids.back();
}

Terms prepare_terms(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                    at::TensorList weights, at::TensorList indices, at::IntArrayRef transposed,
                    at::TensorList value_weights, at::TensorList value_indices) {
  TORCH_CHECK(weights.size() == indices.size() && weights.size() == transposed.size(), op,
              ": expected as many weights, indices and transposed flags, got ", weights.size(), ", ", indices.size(),
              " and ", transposed.size());
  TORCH_CHECK(value_weights.size() == value_indices.size(), op,
              ": expected as many value weights as value indices, got ", value_weights.size(), " and ",
              value_indices.size());
  const int64_t H = q.size(1), Lq = q.size(2), Lk = k.size(2), d = q.size(3), dv = v.size(3);
  Terms terms;
  for (const auto t : c10::irange(weights.size())) {
    const at::Tensor& weight = weights[t];
    const at::Tensor& index = indices[t];
    const bool tr = transposed[t] != 0;
    const int64_t rows = tr ? Lk : Lq;
    TORCH_CHECK(weight.device().is_cpu() && index.device().is_cpu(), op, ": term ", t,
                ": expected CPU tensors, got ", weight.device(), " and ", index.device());
    TORCH_CHECK(weight.scalar_type() == q.scalar_type(), op, ": term ", t, ": expected a ", q.scalar_type(),
                " weight, got ", weight.scalar_type());
    const bool ctx = weight.dim() == 3;
    TORCH_CHECK((weight.dim() == 2 || ctx) && (weight.size(0) == 1 || weight.size(0) == H) &&
                    (!ctx || weight.size(1) == d),
                op, ": term ", t, ": expected a weight of shape (Hw, nb) (bias) or (Hw, ", d,
                ", nb) (contextual) with Hw = 1 or ", H, ", got ", weight.sizes());
    const int64_t nb = weight.size(-1);
    TORCH_CHECK(nb < (int64_t{1} << 31), op, ": term ", t, ": too many buckets");
    TORCH_CHECK(index.scalar_type() == at::kLong || index.scalar_type() == at::kInt, op, ": term ", t,
                ": expected int64 or int32 bucket ids, got ", index.scalar_type());
    TORCH_CHECK(index.dim() == 2 && index.size(0) == rows && index.size(1) == (tr ? Lq : Lk), op, ": term ", t,
                ": expected bucket ids of shape (", rows, ", ", tr ? Lq : Lk, "), got ", index.sizes());
    // A transposed term's ids are kept as flat offsets into its transposed (nb x rows) table: its gathers and
    // scatters then take one int32 load per logit, like a term on keys.
    TORCH_CHECK(!tr || rows * nb < (int64_t{1} << 31), op, ": term ", t, ": table too large (", rows, " x ", nb, ")");
    KernelIds& ids = kernel_ids(op, terms, index, nb);
    terms.weights.push_back(weight.contiguous());
    const TermSpec spec{terms.weights.back().const_data_ptr(), weight.size(0), d, nb, rows, ctx, tr,
                        tr ? ids.transposed() : ids.ids.const_data_ptr<int32_t>(), terms.table_elements,
                        terms.grad_elements, terms.weight_elements};
    terms.table_elements += ctx || tr ? rows * nb : 0;  // a transposed bias term gets its row repeated
    terms.grad_elements += rows * nb;
    terms.weight_elements += weight.numel();
    terms.max_nb = std::max(terms.max_nb, nb);
    terms.specs.push_back(spec);
  }
  for (const auto u : c10::irange(value_weights.size())) {
    const at::Tensor& weight = value_weights[u];
    const at::Tensor& index = value_indices[u];
    TORCH_CHECK(weight.device().is_cpu() && index.device().is_cpu(), op, ": value term ", u,
                ": expected CPU tensors, got ", weight.device(), " and ", index.device());
    TORCH_CHECK(weight.scalar_type() == q.scalar_type(), op, ": value term ", u, ": expected a ", q.scalar_type(),
                " weight, got ", weight.scalar_type());
    TORCH_CHECK(weight.dim() == 3 && (weight.size(0) == 1 || weight.size(0) == H) && weight.size(2) == dv, op,
                ": value term ", u, ": expected a weight of shape (Hw, nb, ", dv, ") with Hw = 1 or ", H, ", got ",
                weight.sizes());
    const int64_t nb = weight.size(1);
    TORCH_CHECK(nb < (int64_t{1} << 31), op, ": value term ", u, ": too many buckets");
    TORCH_CHECK(index.scalar_type() == at::kLong || index.scalar_type() == at::kInt, op, ": value term ", u,
                ": expected int64 or int32 bucket ids, got ", index.scalar_type());
    TORCH_CHECK(index.dim() == 2 && index.size(0) == Lq && index.size(1) == Lk, op, ": value term ", u,
                ": expected bucket ids of shape (", Lq, ", ", Lk, "), got ", index.sizes());
    KernelIds& ids = kernel_ids(op, terms, index, nb);
    terms.weights.push_back(weight.contiguous());
    terms.values.push_back(ValueSpec{terms.weights.back().const_data_ptr(), weight.size(0), nb, dv,
                                     ids.ids.const_data_ptr<int32_t>(), terms.value_nb, terms.weight_elements});
    terms.value_nb += nb;
    terms.weight_elements += weight.numel();
    terms.max_nb = std::max(terms.max_nb, nb);
  }
  return terms;
}

// The terms' views for (b, h): contextual tables are computed into `tables` (a thread's workspace).
template <typename scalar_t>
void make_views(const Terms& terms, const Mat<scalar_t>& qm, const Mat<scalar_t>& km, int64_t h, scalar_t scale,
                scalar_t* tables, TermView<scalar_t>* views) {
  for (const auto t : c10::irange(terms.specs.size())) {
    const TermSpec& spec = terms.specs[t];
    const scalar_t* w = static_cast<const scalar_t*>(spec.weight) + h * spec.head_stride();
    TermView<scalar_t>& view = views[t];
    view = TermView<scalar_t>{w, 0, spec.ids, spec.transposed, nullptr, spec.nb};
    scalar_t* table = tables + spec.table_offset;
    if (spec.transposed) {  // the (nb x rows) table: s (k W)^T = s W^T k^T, or the weight's column repeated
      if (spec.contextual) {
        gemm<scalar_t>(true, true, spec.nb, spec.rows, spec.d, scale, w, spec.nb, km.p, km.ld, 0, table, spec.rows);
      } else {
        for (int64_t c = 0; c < spec.nb; ++c) {
          std::fill(table + c * spec.rows, table + (c + 1) * spec.rows, w[c]);
        }
      }
      view.rows = table;
    } else if (spec.contextual) {  // the (rows x nb) table s q W
      gemm<scalar_t>(false, false, spec.rows, spec.nb, spec.d, scale, qm.p, qm.ld, w, spec.nb, 0, table, spec.nb);
      view.rows = table;
      view.sr = spec.nb;
    }
  }
}

// The weight of value term u for head h, as a (nb x dv) row-major matrix.
template <typename scalar_t>
const scalar_t* value_weight(const ValueSpec& spec, int64_t h) {
  return static_cast<const scalar_t*>(spec.weight) + h * spec.head_stride();
}

std::tuple<at::Tensor, at::Tensor> rpe_attention_cpu(const at::Tensor& q_in, const at::Tensor& k_in,
                                                     const at::Tensor& v_in, at::TensorList weights,
                                                     at::TensorList indices, at::IntArrayRef transposed,
                                                     at::TensorList value_weights, at::TensorList value_indices,
                                                     double scale, const std::optional<at::Tensor>& attn_mask) {
  constexpr const char* op = "rpe_ops::rpe_attention";
  const at::AutoDispatchBelowADInplaceOrView below_autograd;  // the block products are not part of any graph
  check_qkv(op, q_in, k_in, v_in);
  const Terms terms = prepare_terms(op, q_in, k_in, v_in, weights, indices, transposed, value_weights, value_indices);
  const at::Tensor mask = prepare_mask(op, attn_mask, q_in, k_in);
  const at::Tensor q = last_dim_contiguous(q_in), k = last_dim_contiguous(k_in), v = last_dim_contiguous(v_in);
  const int64_t B = q.size(0), H = q.size(1), Lq = q.size(2), Lk = k.size(2), d = q.size(3), dv = v.size(3);
  // (B, Lq, H, dv) in memory, as PyTorch's fused attention returns it: merging the heads afterwards is then a view.
  at::Tensor out = at::empty({B, Lq, H, dv}, q.options()).permute({0, 2, 1, 3});
  at::Tensor lse = at::empty({B, H, Lq}, q.options());
  if (out.numel() == 0 || lse.numel() == 0) {
    if (lse.numel() > 0) {
      lse.fill_(-std::numeric_limits<double>::infinity());  // no keys: empty softmax
    }
    return {out, lse};
  }
  const int64_t n_terms = static_cast<int64_t>(terms.specs.size());
  const int64_t rows_per_block = block_rows(Lq, Lk);
  // One workspace per thread (a block of logits, the contextual tables, the block's bucket sums for the value terms
  // and the scatter copies), allocated here: buffers malloc'ed inside the workers go to per-thread arenas, which
  // return memory to the OS eagerly, and the page faults that follow cost the rest of the step dearly.
  const int64_t per_thread = rows_per_block * Lk + terms.table_elements + rows_per_block * terms.value_nb +
                             kCopies * terms.max_nb + rows_per_block;
  at::Tensor workspace = at::empty({at::get_num_threads(), per_thread}, q.options());
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "rpe_attention_cpu", [&] {
    const auto s = static_cast<scalar_t>(scale);
    const MaskView<scalar_t> mv = mask_view<scalar_t>(mask);
    scalar_t* lse_data = lse.mutable_data_ptr<scalar_t>();
    scalar_t* ws_data = workspace.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, B * H, 1, [&](int64_t t0, int64_t t1) {
      const at::AutoDispatchBelowADInplaceOrView worker_below_autograd;  // OpenMP workers start without the guard
      scalar_t* logits = ws_data + at::get_thread_num() * per_thread;
      scalar_t* tables = logits + rows_per_block * Lk;
      scalar_t* value_sums = tables + terms.table_elements;  // (rows_per_block x nb) per value term
      scalar_t* scratch = value_sums + rows_per_block * terms.value_nb;
      scalar_t* inv_sums = scratch + kCopies * terms.max_nb;  // 1 / (row sum of exp) per row of the block
      std::vector<TermView<scalar_t>> views(n_terms);
      for (int64_t bh = t0; bh < t1; ++bh) {
        const int64_t b = bh / H, h = bh % H;
        const Mat<scalar_t> qm = mat<scalar_t>(q, b, h), km = mat<scalar_t>(k, b, h), vm = mat<scalar_t>(v, b, h);
        const Mat<scalar_t> om = mat<scalar_t>(out, b, h);
        make_views(terms, qm, km, h, s, tables, views.data());
        for (int64_t i0 = 0; i0 < Lq; i0 += rows_per_block) {
          const int64_t n = std::min(rows_per_block, Lq - i0);
          if (n_terms > 0) {
            for (int64_t r = 0; r < n; ++r) {
              set_bias_row(logits + r * Lk, Lk, views.data(), n_terms, i0 + r);
            }
          }
          const scalar_t beta = n_terms > 0 ? 1 : 0;
          gemm<scalar_t>(false, true, n, Lk, d, s, qm.row(i0), qm.ld, km.p, km.ld, beta, logits, Lk);  // + s Q K^T
          for (int64_t r = 0; r < n; ++r) {
            scalar_t* row = logits + r * Lk;
            if (mv.p != nullptr) {
              add_row(row, mv.row(b, h, i0 + r), Lk);
            }
            // The block keeps exp(logits - max): its products with V and W_v are normalised afterwards, on the dv
            // outputs of a row rather than its Lk probabilities.
            const scalar_t m = row_max(row, Lk);
            const scalar_t sum = exp_shift_sum_masked(row, Lk, m);
            inv_sums[r] = sum > 0 ? scalar_t(1) / sum : scalar_t(0);  // Lk = 0 or every key masked: a zero output
            lse_data[bh * Lq + i0 + r] = m + std::log(sum);
            for (const ValueSpec& value : terms.values) {  // S[r] = bucket sums of the row, while it is in L1
              scalar_t* sums = value_sums + value.block_offset * rows_per_block + r * value.nb;
              bucket_sum_one_row(row, Lk, value.ids + (i0 + r) * Lk, value.nb, scratch, sums, /*accumulate=*/false);
            }
          }
          gemm<scalar_t>(false, false, n, dv, Lk, 1, logits, Lk, vm.p, vm.ld, 0, om.row(i0), om.ld);  // P V
          for (const ValueSpec& value : terms.values) {  // O += S W_v
            gemm<scalar_t>(false, false, n, dv, value.nb, 1, value_sums + value.block_offset * rows_per_block,
                           value.nb, value_weight<scalar_t>(value, h), dv, 1, om.row(i0), om.ld);
          }
          for (int64_t r = 0; r < n; ++r) {
            scale_row(om.row(i0 + r), dv, inv_sums[r]);
          }
        }
      }
    });
  });
  return {out, lse};
}

std::vector<at::Tensor> rpe_attention_backward_cpu(const at::Tensor& grad_out_in, const at::Tensor& q_in,
                                                   const at::Tensor& k_in, const at::Tensor& v_in,
                                                   const at::Tensor& lse_in, at::TensorList weights,
                                                   at::TensorList indices, at::IntArrayRef transposed,
                                                   at::TensorList value_weights, at::TensorList value_indices,
                                                   double scale, const std::optional<at::Tensor>& attn_mask) {
  constexpr const char* op = "rpe_ops::rpe_attention_backward";
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  check_qkv(op, q_in, k_in, v_in);
  const Terms terms = prepare_terms(op, q_in, k_in, v_in, weights, indices, transposed, value_weights, value_indices);
  const at::Tensor mask = prepare_mask(op, attn_mask, q_in, k_in);
  const int64_t B = q_in.size(0), H = q_in.size(1), Lq = q_in.size(2), Lk = k_in.size(2), d = q_in.size(3);
  const int64_t dv = v_in.size(3);
  TORCH_CHECK(grad_out_in.sizes() == at::IntArrayRef({B, H, Lq, dv}), op, ": expected grad_out of shape ",
              at::IntArrayRef({B, H, Lq, dv}), ", got ", grad_out_in.sizes());
  TORCH_CHECK(lse_in.sizes() == at::IntArrayRef({B, H, Lq}), op, ": expected lse of shape (", B, ", ", H, ", ", Lq,
              "), got ", lse_in.sizes());
  for (const at::Tensor* t : {&grad_out_in, &lse_in}) {
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == q_in.scalar_type(), op,
                ": expected grad_out and lse on the CPU with the dtype of q (", q_in.scalar_type(), "), got ",
                t->device(), " ", t->scalar_type());
  }
  const at::Tensor q = last_dim_contiguous(q_in), k = last_dim_contiguous(k_in), v = last_dim_contiguous(v_in);
  const at::Tensor go = last_dim_contiguous(grad_out_in), lse = lse_in.contiguous();
  at::Tensor dq = at::empty(q.sizes(), q.options());
  at::Tensor dk = at::zeros(k.sizes(), k.options());
  at::Tensor dvv = at::zeros(v.sizes(), v.options());
  const int64_t n_terms = static_cast<int64_t>(terms.specs.size());
  const int64_t threads = at::get_num_threads();
  // Each thread sums its weight gradients apart (deterministic for a given thread count); added up at the end.
  at::Tensor weight_grads = at::zeros({threads, terms.weight_elements}, q.options());
  if (B * H * Lq * Lk > 0) {
    const int64_t rows_per_block = block_rows(Lq, Lk);
    // probabilities and their gradient (a block each), contextual tables, tables' gradients, scatter copies, and per
    // value term a block of dO W_v^T and one of bucket sums of the probabilities
    const int64_t per_thread = 2 * rows_per_block * Lk + terms.table_elements + terms.grad_elements +
                               kCopies * terms.max_nb + 2 * rows_per_block * terms.value_nb;
    at::Tensor workspace = at::empty({threads, per_thread}, q.options());  // see forward
    AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "rpe_attention_backward_cpu", [&] {
      const auto s = static_cast<scalar_t>(scale);
      const MaskView<scalar_t> mv = mask_view<scalar_t>(mask);
      const scalar_t* lse_data = lse.const_data_ptr<scalar_t>();
      scalar_t* ws_data = workspace.mutable_data_ptr<scalar_t>();
      scalar_t* wg_data = weight_grads.mutable_data_ptr<scalar_t>();
      at::parallel_for(0, B * H, 1, [&](int64_t t0, int64_t t1) {
        const at::AutoDispatchBelowADInplaceOrView worker_below_autograd;
        const int64_t tid = at::get_thread_num();
        scalar_t* probs = ws_data + tid * per_thread;
        scalar_t* grads = probs + rows_per_block * Lk;
        scalar_t* tables = grads + rows_per_block * Lk;
        scalar_t* table_grads = tables + terms.table_elements;
        scalar_t* scratch = table_grads + terms.grad_elements;
        scalar_t* value_grads = scratch + kCopies * terms.max_nb;  // dO W_v^T (rows_per_block x nb) per value term
        scalar_t* value_sums = value_grads + rows_per_block * terms.value_nb;  // bucket sums of P, likewise
        scalar_t* weight_grad = wg_data + tid * terms.weight_elements;
        std::vector<TermView<scalar_t>> views(n_terms);
        for (int64_t bh = t0; bh < t1; ++bh) {
          const int64_t b = bh / H, h = bh % H;
          const Mat<scalar_t> qm = mat<scalar_t>(q, b, h), km = mat<scalar_t>(k, b, h), vm = mat<scalar_t>(v, b, h);
          const Mat<scalar_t> gm = mat<scalar_t>(go, b, h), dqm = mat<scalar_t>(dq, b, h);
          const Mat<scalar_t> dkm = mat<scalar_t>(dk, b, h), dvm = mat<scalar_t>(dvv, b, h);
          make_views(terms, qm, km, h, s, tables, views.data());
          std::fill(table_grads, table_grads + terms.grad_elements, scalar_t(0));
          for (const auto t : c10::irange(n_terms)) {
            views[t].grad = table_grads + terms.specs[t].grad_offset;
          }
          for (int64_t i0 = 0; i0 < Lq; i0 += rows_per_block) {
            const int64_t n = std::min(rows_per_block, Lq - i0);
            const scalar_t *qb = qm.row(i0), *gb = gm.row(i0);
            if (n_terms > 0) {  // the bias first, then BLAS adds s Q K^T (as in the forward)
              for (int64_t r = 0; r < n; ++r) {
                set_bias_row(probs + r * Lk, Lk, views.data(), n_terms, i0 + r);
              }
            }
            gemm<scalar_t>(false, true, n, Lk, d, s, qb, qm.ld, km.p, km.ld, n_terms > 0 ? 1 : 0, probs, Lk);
            for (int64_t r = 0; r < n; ++r) {  // the probabilities, from the saved log-sum-exp (the mask as forward)
              if (mv.p != nullptr) {
                add_row(probs + r * Lk, mv.row(b, h, i0 + r), Lk);
              }
              exp_shift_sum_masked(probs + r * Lk, Lk, lse_data[bh * Lq + i0 + r]);
            }
            gemm<scalar_t>(true, false, Lk, dv, n, 1, probs, Lk, gb, gm.ld, 1, dvm.p, dvm.ld);  // dV += P^T dO
            // dP = dO V^T + the value terms' G[i, bucket(i, j)], G = dO W_v^T: the gathers (with the bucket sums of
            // P) write the block first and BLAS adds dO V^T to it.
            for (const ValueSpec& value : terms.values) {
              gemm<scalar_t>(false, true, n, value.nb, dv, 1, gb, gm.ld, value_weight<scalar_t>(value, h), dv, 0,
                             value_grads + value.block_offset * rows_per_block, value.nb);
            }
            for (int64_t r = 0; r < n; ++r) {
              bool first = true;
              for (const ValueSpec& value : terms.values) {
                const int64_t nb = value.nb, offset = value.block_offset * rows_per_block + r * nb;
                value_row_backward(grads + r * Lk, probs + r * Lk, Lk, value_grads + offset, value.ids + (i0 + r) * Lk,
                                   nb, scratch, value_sums + offset, first);
                first = false;
              }
            }
            const scalar_t value_beta = terms.values.empty() ? 0 : 1;
            gemm<scalar_t>(false, true, n, Lk, dv, 1, gb, gm.ld, vm.p, vm.ld, value_beta, grads, Lk);  // + dO V^T
            for (int64_t r = 0; r < n; ++r) {
              scalar_t* row = grads + r * Lk;
              // rowsum(P * dP) from the block rather than dO . O (flash attention's shortcut): when the softmax
              // saturates, the difference dP - rowsum then cancels between numbers rounded the same way.
              const scalar_t delta = row_dot(probs + r * Lk, row, Lk);
              softmax_grad_row(row, probs + r * Lk, Lk, delta);
              bucket_sum_row(row, Lk, views.data(), n_terms, i0 + r, scratch);
            }
            gemm<scalar_t>(false, false, n, d, Lk, s, grads, Lk, km.p, km.ld, 0, dqm.row(i0), dqm.ld);  // dQ = s dS K
            gemm<scalar_t>(true, false, Lk, d, n, s, grads, Lk, qb, qm.ld, 1, dkm.p, dkm.ld);  // dK += s dS^T Q
            for (const ValueSpec& value : terms.values) {  // dW_v += S^T dO
              scalar_t* dw = weight_grad + value.weight_offset + h * value.head_stride();
              gemm<scalar_t>(true, false, value.nb, dv, n, 1, value_sums + value.block_offset * rows_per_block,
                             value.nb, gb, gm.ld, 1, dw, dv);
            }
          }
          // Back through the tables: a contextual table s * x W gives dx += s * dT W^T and dW += s * x^T dT; a bias
          // table (the weight's row repeated) gives dW += the column sums of dT. A transposed term's gradient is
          // dT^T, (nb x rows).
          for (const auto t : c10::irange(n_terms)) {
            const TermSpec& spec = terms.specs[t];
            const scalar_t* dt = views[t].grad;
            const bool tr = spec.transposed;
            scalar_t* dw = weight_grad + spec.weight_offset + h * spec.head_stride();
            if (spec.contextual) {
              const scalar_t* w = static_cast<const scalar_t*>(spec.weight) + h * spec.head_stride();
              const Mat<scalar_t>& x = tr ? km : qm;
              const Mat<scalar_t>& dx = tr ? dkm : dqm;
              const int64_t ldt = tr ? spec.rows : spec.nb;
              gemm<scalar_t>(tr, true, spec.rows, spec.d, spec.nb, s, dt, ldt, w, spec.nb, 1, dx.p, dx.ld);
              gemm<scalar_t>(true, tr, spec.d, spec.nb, spec.rows, s, x.p, x.ld, dt, ldt, 1, dw, spec.nb);
            } else if (tr) {
              for (int64_t c = 0; c < spec.nb; ++c) {
                dw[c] += simd_sum(dt + c * spec.rows, spec.rows);
              }
            } else {
              for (int64_t r = 0; r < spec.rows; ++r) {
                for (int64_t c = 0; c < spec.nb; ++c) {
                  dw[c] += dt[r * spec.nb + c];
                }
              }
            }
          }
        }
      });
    });
  } else {
    dq.zero_();
  }
  std::vector<at::Tensor> result{dq, dk, dvv};
  const at::Tensor weight_grad = weight_grads.sum(0);
  for (const auto t : c10::irange(n_terms)) {
    const at::Tensor& weight = terms.weights[t];
    result.push_back(weight_grad.narrow(0, terms.specs[t].weight_offset, weight.numel()).view(weight.sizes()));
  }
  for (const auto u : c10::irange(terms.values.size())) {
    const at::Tensor& weight = terms.weights[n_terms + u];
    result.push_back(weight_grad.narrow(0, terms.values[u].weight_offset, weight.numel()).view(weight.sizes()));
  }
  return result;
}

}  // namespace
}  // namespace rpe_ops

TORCH_LIBRARY_FRAGMENT(rpe_ops, m) {
  // rpe_ops/__init__.py checks these argument names: a library built from an older schema is reported as stale.
  m.def(
      "rpe_attention(Tensor q, Tensor k, Tensor v, Tensor[] weights, Tensor[] indices, int[] transposed,"
      " Tensor[] value_weights, Tensor[] value_indices, float scale, Tensor? attn_mask=None) -> (Tensor, Tensor)",
      {at::Tag::pt2_compliant_tag});
  m.def(
      "rpe_attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor lse, Tensor[] weights,"
      " Tensor[] indices, int[] transposed, Tensor[] value_weights, Tensor[] value_indices, float scale,"
      " Tensor? attn_mask=None) -> Tensor[]",
      {at::Tag::pt2_compliant_tag});
}

TORCH_LIBRARY_IMPL(rpe_ops, CPU, m) {
  m.impl("rpe_attention", &rpe_ops::rpe_attention_cpu);
  m.impl("rpe_attention_backward", &rpe_ops::rpe_attention_backward_cpu);
}
