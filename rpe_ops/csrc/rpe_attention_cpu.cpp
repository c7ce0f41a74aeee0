// rpe_ops::rpe_attention / rpe_attention_backward: attention with iRPE logit terms in one CPU kernel.
//
//   logits[b,h,i,j] = scale * q[b,h,i] . k[b,h,j] + sum_t bias_t[b,h,i,j]
//   bias_t[b,h,i,j] = table_t[b,h,i,index_t[i,j]]            (a term on keys: rows looked up with the queries)
//                   = table_t[b,h,j,index_t[j,i]]            (a transposed term, on queries: looked up with the keys)
//   out = softmax(logits) @ v,  lse[b,h,i] = logsumexp_j logits[b,h,i,j]
//
// Why a kernel: the bias is what makes iRPE cost more than plain attention. Materialised, it and the probabilities
// are (B, H, Lq, Lk) tensors streamed through memory several times per pass; PyTorch's fused CPU attention cannot
// give the gradient of a bias. Here one task owns one (b, h) pair and walks its query rows in blocks whose logits
// fit in the L2 cache: the bias is gathered from the small (Lq, nb) tables straight into the block, softmax runs on
// it in place, and the backward recomputes the block from the saved log-sum-exp (as flash attention does), turns it
// into the logits' gradient in place and sums that into the tables' buckets before the block leaves the cache.
// Nothing (B, H, Lq, Lk) is ever allocated. The matrix products call ATen's mm (BLAS) on the block views.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <c10/util/irange.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstdint>
#include <cstring>
#include <limits>
#include <tuple>
#include <vector>

#include "rpe_ops.h"

#ifdef __linux__
#include <dlfcn.h>
#endif

// The element-wise loops are compiled for AVX2 as well as the baseline and picked at load time: a wheel built on one
// machine still runs on an older one. Elsewhere the compiler's baseline vectorisation is used.
#if defined(__x86_64__) && defined(__GNUC__) && defined(__linux__)
#define RPE_OPS_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define RPE_OPS_CLONES
#endif

namespace rpe_ops {
namespace {

// Rows of a block are chosen so that a block of logits holds about this many elements (256 KiB in float32).
constexpr int64_t kBlockElements = 65536;

// exp(x) for x <= 0 in float32, written so that loops over it vectorise: round(x / ln 2) by the 1.5 * 2^23 trick,
// a two-part ln 2, a degree-6 polynomial on |r| <= ln(2) / 2 (relative error below 2e-7) and the power of two built
// in the exponent bits. Inputs below -87 give exp(-87) (~1.6e-38) instead of a denormal: it is then divided by a
// row sum >= 1, so the probability stays exact to float32 resolution.
inline float exp_nonpositive(float x) {
  x = x < -87.0f ? -87.0f : x;
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
  return p * pow2;
}

// One logit term as the kernels read it: table element (b, h, row, bucket) at b*sb + h*sh + row*sr + bucket*sn, the
// bucket of logit (i, j) at ids[i * Lk + j] (ids already transposed for a transposed term, whose row is then j).
struct Term {
  const void* table;
  int64_t sb, sh, sr, sn;
  const int32_t* ids;
  bool transposed;
  void* grad;  // (B, H, rows, nb) contiguous, or null in the forward
  int64_t nb;
  int64_t grad_rows;
};

// Reductions over kLanes independent partial results: a plain `acc += x[j]` loop is a serial dependency the compiler
// may not reorder (float addition is not associative), so it would not vectorise.
constexpr int64_t kLanes = 16;

template <typename scalar_t>
inline scalar_t lane_sum(const scalar_t* __restrict__ x, int64_t n) {
  scalar_t acc[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    for (int64_t l = 0; l < kLanes; ++l) {
      acc[l] += x[j + l];
    }
  }
  for (; j < n; ++j) {
    acc[0] += x[j];
  }
  scalar_t sum = 0;
  for (int64_t l = 0; l < kLanes; ++l) {
    sum += acc[l];
  }
  return sum;
}

template <typename scalar_t>
inline scalar_t lane_max(const scalar_t* __restrict__ x, int64_t n) {
  scalar_t acc[kLanes];
  for (int64_t l = 0; l < kLanes; ++l) {
    acc[l] = -std::numeric_limits<scalar_t>::infinity();
  }
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    for (int64_t l = 0; l < kLanes; ++l) {
      acc[l] = acc[l] > x[j + l] ? acc[l] : x[j + l];
    }
  }
  for (; j < n; ++j) {
    acc[0] = acc[0] > x[j] ? acc[0] : x[j];
  }
  scalar_t m = acc[0];
  for (int64_t l = 1; l < kLanes; ++l) {
    m = m > acc[l] ? m : acc[l];
  }
  return m;
}

template <typename scalar_t>
inline scalar_t lane_dot(const scalar_t* __restrict__ x, const scalar_t* __restrict__ y, int64_t n) {
  scalar_t acc[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    for (int64_t l = 0; l < kLanes; ++l) {
      acc[l] += x[j + l] * y[j + l];
    }
  }
  for (; j < n; ++j) {
    acc[0] += x[j] * y[j];
  }
  scalar_t sum = 0;
  for (int64_t l = 0; l < kLanes; ++l) {
    sum += acc[l];
  }
  return sum;
}

// row[j] = row[j] * scale + bias(i, j) for every term. Tables with contiguous buckets (the usual case) get their own
// loops, which AVX2 turns into vector gathers.
template <typename scalar_t>
inline void add_bias_row_impl(scalar_t* __restrict__ row, int64_t Lk, scalar_t scale, const std::vector<Term>& terms,
                              int64_t b, int64_t h, int64_t i) {
  for (int64_t j = 0; j < Lk; ++j) {
    row[j] *= scale;
  }
  for (const Term& t : terms) {
    const scalar_t* base = static_cast<const scalar_t*>(t.table) + b * t.sb + h * t.sh;
    const int32_t* __restrict__ ix = t.ids + i * Lk;
    const int64_t sr = t.sr, sn = t.sn;
    if (t.transposed) {
      if (sn == 1) {
        for (int64_t j = 0; j < Lk; ++j) {
          row[j] += base[j * sr + ix[j]];
        }
      } else {
        for (int64_t j = 0; j < Lk; ++j) {
          row[j] += base[j * sr + ix[j] * sn];
        }
      }
    } else {
      const scalar_t* __restrict__ trow = base + i * sr;
      if (sn == 1) {
        for (int64_t j = 0; j < Lk; ++j) {
          row[j] += trow[ix[j]];
        }
      } else {
        for (int64_t j = 0; j < Lk; ++j) {
          row[j] += trow[ix[j] * sn];
        }
      }
    }
  }
}

RPE_OPS_CLONES void add_bias_row(float* row, int64_t Lk, float scale, const std::vector<Term>& terms, int64_t b,
                                 int64_t h, int64_t i) {
  add_bias_row_impl(row, Lk, scale, terms, b, h, i);
}
void add_bias_row(double* row, int64_t Lk, double scale, const std::vector<Term>& terms, int64_t b, int64_t h,
                  int64_t i) {
  add_bias_row_impl(row, Lk, scale, terms, b, h, i);
}

RPE_OPS_CLONES float row_max(const float* row, int64_t n) { return lane_max(row, n); }
double row_max(const double* row, int64_t n) { return lane_max(row, n); }

RPE_OPS_CLONES float row_dot(const float* x, const float* y, int64_t n) { return lane_dot(x, y, n); }
double row_dot(const double* x, const double* y, int64_t n) { return lane_dot(x, y, n); }

// row[j] = exp(row[j] - shift) (every row[j] <= shift); returns the sum.
RPE_OPS_CLONES float exp_shift_sum(float* __restrict__ row, int64_t n, float shift) {
  for (int64_t j = 0; j < n; ++j) {
    row[j] = exp_nonpositive(row[j] - shift);
  }
  return lane_sum(row, n);
}

double exp_shift_sum(double* __restrict__ row, int64_t n, double shift) {
  for (int64_t j = 0; j < n; ++j) {
    row[j] = std::exp(row[j] - shift);
  }
  return lane_sum(row, n);
}

// grad[j] = prob[j] * (grad[j] - delta): the logits' gradient from the probabilities' gradient.
template <typename scalar_t>
inline void softmax_grad_row_impl(scalar_t* __restrict__ grad, const scalar_t* __restrict__ prob, int64_t n,
                                  scalar_t delta) {
  for (int64_t j = 0; j < n; ++j) {
    grad[j] = prob[j] * (grad[j] - delta);
  }
}
RPE_OPS_CLONES void softmax_grad_row(float* grad, const float* prob, int64_t n, float delta) {
  softmax_grad_row_impl(grad, prob, n, delta);
}
void softmax_grad_row(double* grad, const double* prob, int64_t n, double delta) {
  softmax_grad_row_impl(grad, prob, n, delta);
}

template <typename scalar_t>
inline void scale_row_impl(scalar_t* __restrict__ row, int64_t n, scalar_t factor) {
  for (int64_t j = 0; j < n; ++j) {
    row[j] *= factor;
  }
}
RPE_OPS_CLONES void scale_row(float* row, int64_t n, float factor) { scale_row_impl(row, n, factor); }
void scale_row(double* row, int64_t n, double factor) { scale_row_impl(row, n, factor); }

// Sums the logits' gradient of row i into the buckets of every term.
template <typename scalar_t>
void bucket_sum_row(const scalar_t* __restrict__ g, int64_t Lk, const std::vector<Term>& terms, int64_t bh,
                    int64_t i) {
  for (const Term& t : terms) {
    scalar_t* base = static_cast<scalar_t*>(t.grad) + bh * t.grad_rows * t.nb;
    const int32_t* __restrict__ ix = t.ids + i * Lk;
    if (t.transposed) {
      for (int64_t j = 0; j < Lk; ++j) {
        base[j * t.nb + ix[j]] += g[j];
      }
    } else {
      scalar_t* __restrict__ grow = base + i * t.nb;
      for (int64_t j = 0; j < Lk; ++j) {
        grow[ix[j]] += g[j];
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------------
// Block products. Going through the dispatcher (at::addmm_out) costs microseconds per call, and the kernels make
// five calls per block: when the BLAS that ATen itself uses exports its Fortran `sgemm_`/`dgemm_` (MKL in the x86
// wheels), the products call it directly; otherwise they take at::addmm_out.

using sgemm_fn = void (*)(const char*, const char*, const int*, const int*, const int*, const float*, const float*,
                          const int*, const float*, const int*, const float*, float*, const int*);
using dgemm_fn = void (*)(const char*, const char*, const int*, const int*, const int*, const double*, const double*,
                          const int*, const double*, const int*, const double*, double*, const int*);

// RPE_OPS_BLAS=0 forces the dispatcher path (tests cover both).
void* find_blas_symbol(const char* name) {
  const char* env = std::getenv("RPE_OPS_BLAS");
  if (env != nullptr && std::strcmp(env, "0") == 0) {
    return nullptr;
  }
#ifdef __linux__
  static void* torch_cpu = dlopen("libtorch_cpu.so", RTLD_LAZY | RTLD_NOLOAD);
  if (torch_cpu != nullptr) {
    if (void* f = dlsym(torch_cpu, name)) {
      return f;
    }
  }
  return nullptr;
#else
  (void)name;
  return nullptr;
#endif
}

template <typename scalar_t>
struct Blas;
template <>
struct Blas<float> {
  static sgemm_fn get() {
    static const auto f = reinterpret_cast<sgemm_fn>(find_blas_symbol("sgemm_"));
    return f;
  }
};
template <>
struct Blas<double> {
  static dgemm_fn get() {
    static const auto f = reinterpret_cast<dgemm_fn>(find_blas_symbol("dgemm_"));
    return f;
  }
};

// How BLAS reads a row-major 2-D view: "N" with ld = row stride when rows are contiguous, "T" with ld = column
// stride when columns are (a transposed view). Row-major x (r x c) read column-major is x^T.
bool blas_operand(const at::Tensor& t, char& trans, int& ld) {
  const int64_t rows = t.size(0), cols = t.size(1);
  if (t.stride(1) == 1 && t.stride(0) >= cols) {
    trans = 'N';
    ld = static_cast<int>(std::max<int64_t>(t.stride(0), 1));
    return t.stride(0) < (int64_t{1} << 31);
  }
  if (t.stride(0) == 1 && t.stride(1) >= rows) {
    trans = 'T';
    ld = static_cast<int>(std::max<int64_t>(t.stride(1), 1));
    return t.stride(1) < (int64_t{1} << 31);
  }
  return false;
}

// c = beta * c + alpha * a @ b for 2-D views (c: contiguous rows; with beta = 0, c is not read).
template <typename scalar_t>
void gemm_into(at::Tensor c, const at::Tensor& a, const at::Tensor& b, double beta, double alpha) {
  const auto f = Blas<scalar_t>::get();
  const int64_t m = a.size(0), k = a.size(1), n = b.size(1);
  char ta = 'N', tb = 'N';
  int lda = 1, ldb = 1;
  const bool direct = f != nullptr && m > 0 && n > 0 && k > 0 && std::max({m, n, k}) < (int64_t{1} << 31) &&
                      c.stride(1) == 1 && c.stride(0) >= n && c.stride(0) < (int64_t{1} << 31) &&
                      blas_operand(a, ta, lda) && blas_operand(b, tb, ldb);
  if (!direct) {
    at::addmm_out(c, c, a, b, beta, alpha);
    return;
  }
  // column-major c^T (n x m) = b^T a^T: b goes first
  const int mi = static_cast<int>(m), ni = static_cast<int>(n), ki = static_cast<int>(k);
  const int ldc = static_cast<int>(c.stride(0));
  const auto alpha_ = static_cast<scalar_t>(alpha), beta_ = static_cast<scalar_t>(beta);
  f(&tb, &ta, &ni, &mi, &ki, &alpha_, b.const_data_ptr<scalar_t>(), &ldb, a.const_data_ptr<scalar_t>(), &lda, &beta_,
    c.mutable_data_ptr<scalar_t>(), &ldc);
}

int64_t block_rows(int64_t Lq, int64_t Lk) {
  return std::max<int64_t>(1, std::min<int64_t>(Lq, kBlockElements / std::max<int64_t>(Lk, 1)));
}

// q, k, v, ... as matrices of one (b, h): their last dim must be contiguous for the BLAS calls.
at::Tensor last_dim_contiguous(const at::Tensor& t) { return t.size(-1) <= 1 || t.stride(-1) == 1 ? t : t.contiguous(); }

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

// Validates the terms and brings them to the kernels' form: int32 ids, transposed for transposed terms.
std::vector<at::Tensor> prepare_ids(const char* op, const at::Tensor& q, const at::Tensor& k,
                                    at::TensorList tables, at::TensorList indices, at::IntArrayRef transposed) {
  TORCH_CHECK(tables.size() == indices.size() && tables.size() == transposed.size(), op,
              ": expected as many tables, indices and transposed flags, got ", tables.size(), ", ", indices.size(),
              " and ", transposed.size());
  const int64_t B = q.size(0), H = q.size(1), Lq = q.size(2), Lk = k.size(2);
  std::vector<at::Tensor> ids;
  for (const auto t : c10::irange(tables.size())) {
    const at::Tensor& table = tables[t];
    const at::Tensor& index = indices[t];
    const bool tr = transposed[t] != 0;
    const int64_t rows = tr ? Lk : Lq;
    TORCH_CHECK(table.device().is_cpu() && index.device().is_cpu(), op, ": term ", t, ": expected CPU tensors, got ",
                table.device(), " and ", index.device());
    TORCH_CHECK(table.scalar_type() == q.scalar_type(), op, ": term ", t, ": expected a ", q.scalar_type(),
                " table, got ", table.scalar_type());
    TORCH_CHECK(table.dim() == 4 && table.size(0) == B && table.size(1) == H && table.size(2) == rows, op,
                ": term ", t, ": expected a table of shape (", B, ", ", H, ", ", rows,
                ", nb) (expand broadcast dims), got ", table.sizes());
    TORCH_CHECK(index.scalar_type() == at::kLong || index.scalar_type() == at::kInt, op, ": term ", t,
                ": expected int64 or int32 bucket ids, got ", index.scalar_type());
    TORCH_CHECK(index.dim() == 2 && index.size(0) == rows && index.size(1) == (tr ? Lq : Lk), op, ": term ", t,
                ": expected bucket ids of shape (", rows, ", ", tr ? Lq : Lk, "), got ", index.sizes());
    TORCH_CHECK(table.size(3) < (int64_t{1} << 31), op, ": term ", t, ": too many buckets");
    at::Tensor idx = index.contiguous();
    check_index_range_cpu(op, idx, table.size(3));
    ids.push_back((tr ? idx.t() : idx).to(at::kInt).contiguous());
  }
  return ids;
}

std::vector<Term> make_terms(at::TensorList tables, const std::vector<at::Tensor>& ids, at::IntArrayRef transposed) {
  std::vector<Term> terms;
  for (const auto t : c10::irange(tables.size())) {
    const at::Tensor& table = tables[t];
    terms.push_back(Term{table.const_data_ptr(), table.stride(0), table.stride(1), table.stride(2), table.stride(3),
                         ids[t].const_data_ptr<int32_t>(), transposed[t] != 0, nullptr, table.size(3),
                         table.size(2)});
  }
  return terms;
}

std::tuple<at::Tensor, at::Tensor> rpe_attention_cpu(const at::Tensor& q_in, const at::Tensor& k_in,
                                                     const at::Tensor& v_in, at::TensorList tables,
                                                     at::TensorList indices, at::IntArrayRef transposed,
                                                     double scale) {
  constexpr const char* op = "rpe_ops::rpe_attention";
  const at::AutoDispatchBelowADInplaceOrView below_autograd;  // the block products are not part of any graph
  check_qkv(op, q_in, k_in, v_in);
  const std::vector<at::Tensor> ids = prepare_ids(op, q_in, k_in, tables, indices, transposed);
  const at::Tensor q = last_dim_contiguous(q_in), k = last_dim_contiguous(k_in), v = last_dim_contiguous(v_in);
  const int64_t B = q.size(0), H = q.size(1), Lq = q.size(2), Lk = k.size(2);
  // (B, Lq, H, dv) in memory, as PyTorch's fused attention returns it: merging the heads afterwards is then a view.
  at::Tensor out = at::empty({B, Lq, H, v.size(3)}, q.options()).permute({0, 2, 1, 3});
  at::Tensor lse = at::empty({B, H, Lq}, q.options());
  if (out.numel() == 0 || lse.numel() == 0) {
    if (lse.numel() > 0) {
      lse.fill_(-std::numeric_limits<double>::infinity());  // no keys: empty softmax
    }
    return {out, lse};
  }
  const std::vector<Term> terms = make_terms(tables, ids, transposed);
  const int64_t rows_per_block = block_rows(Lq, Lk);
  // One block per thread, allocated here: buffers malloc'ed inside the workers go to per-thread arenas, which
  // return memory to the OS eagerly, and the page faults that follow cost the rest of the step dearly.
  const at::Tensor blocks = at::empty({at::get_num_threads(), rows_per_block, Lk}, q.options());
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "rpe_attention_cpu", [&] {
    const auto s = static_cast<scalar_t>(scale);
    at::parallel_for(0, B * H, 1, [&](int64_t t0, int64_t t1) {
      const at::AutoDispatchBelowADInplaceOrView worker_below_autograd;  // OpenMP workers start without the guard
      const at::Tensor block = blocks[at::get_thread_num()];
      scalar_t* logits = block.data_ptr<scalar_t>();
      for (int64_t bh = t0; bh < t1; ++bh) {
        const int64_t b = bh / H, h = bh % H;
        const at::Tensor qm = q[b][h], km_t = k[b][h].t(), vm = v[b][h], om = out[b][h];
        scalar_t* lse_row = lse.mutable_data_ptr<scalar_t>() + bh * Lq;
        for (int64_t i0 = 0; i0 < Lq; i0 += rows_per_block) {
          const int64_t n = std::min(rows_per_block, Lq - i0);
          at::Tensor blk = block.narrow(0, 0, n);
          gemm_into<scalar_t>(blk, qm.narrow(0, i0, n), km_t, 0, 1);
          for (int64_t r = 0; r < n; ++r) {
            scalar_t* row = logits + r * Lk;
            add_bias_row(row, Lk, s, terms, b, h, i0 + r);
            const scalar_t m = row_max(row, Lk);
            const scalar_t sum = exp_shift_sum(row, Lk, m);
            scale_row(row, Lk, scalar_t(1) / sum);
            lse_row[i0 + r] = m + std::log(sum);
          }
          at::Tensor o = om.narrow(0, i0, n);
          gemm_into<scalar_t>(o, blk, vm, 0, 1);
        }
      }
    });
  });
  return {out, lse};
}

std::vector<at::Tensor> rpe_attention_backward_cpu(const at::Tensor& grad_out_in, const at::Tensor& q_in,
                                                   const at::Tensor& k_in, const at::Tensor& v_in,
                                                   const at::Tensor& lse_in,
                                                   at::TensorList tables, at::TensorList indices,
                                                   at::IntArrayRef transposed, double scale) {
  constexpr const char* op = "rpe_ops::rpe_attention_backward";
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  check_qkv(op, q_in, k_in, v_in);
  const std::vector<at::Tensor> ids = prepare_ids(op, q_in, k_in, tables, indices, transposed);
  const int64_t B = q_in.size(0), H = q_in.size(1), Lq = q_in.size(2), Lk = k_in.size(2), dv = v_in.size(3);
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
  std::vector<at::Tensor> grads;
  for (const at::Tensor& table : tables) {
    grads.push_back(at::zeros(table.sizes(), table.options()));
  }
  std::vector<Term> terms = make_terms(tables, ids, transposed);
  for (const auto t : c10::irange(terms.size())) {
    terms[t].grad = grads[t].mutable_data_ptr();
  }
  if (B * H * Lq * Lk > 0) {
    const int64_t rows_per_block = block_rows(Lq, Lk);
    const at::Tensor blocks = at::empty({at::get_num_threads(), 2, rows_per_block, Lk}, q.options());  // see forward
    AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "rpe_attention_backward_cpu", [&] {
      const auto s = static_cast<scalar_t>(scale);
      at::parallel_for(0, B * H, 1, [&](int64_t t0, int64_t t1) {
        const at::AutoDispatchBelowADInplaceOrView worker_below_autograd;
        const at::Tensor probs_buf = blocks[at::get_thread_num()][0];
        const at::Tensor grad_buf = blocks[at::get_thread_num()][1];
        scalar_t* probs = probs_buf.data_ptr<scalar_t>();
        scalar_t* grads_ = grad_buf.data_ptr<scalar_t>();
        for (int64_t bh = t0; bh < t1; ++bh) {
          const int64_t b = bh / H, h = bh % H;
          const at::Tensor qm = q[b][h], km = k[b][h], vm = v[b][h], gm = go[b][h];
          at::Tensor dqm = dq[b][h], dkm = dk[b][h], dvm = dvv[b][h];
          const scalar_t* lse_row = lse.const_data_ptr<scalar_t>() + bh * Lq;
          for (int64_t i0 = 0; i0 < Lq; i0 += rows_per_block) {
            const int64_t n = std::min(rows_per_block, Lq - i0);
            at::Tensor p = probs_buf.narrow(0, 0, n), g = grad_buf.narrow(0, 0, n);
            const at::Tensor qb = qm.narrow(0, i0, n), gb = gm.narrow(0, i0, n);
            gemm_into<scalar_t>(p, qb, km.t(), 0, 1);
            for (int64_t r = 0; r < n; ++r) {  // the probabilities, from the saved log-sum-exp
              scalar_t* row = probs + r * Lk;
              add_bias_row(row, Lk, s, terms, b, h, i0 + r);
              exp_shift_sum(row, Lk, lse_row[i0 + r]);
            }
            gemm_into<scalar_t>(dvm, p.t(), gb, 1, 1);  // dV += P^T dO
            gemm_into<scalar_t>(g, gb, vm.t(), 0, 1);   // dP = dO V^T
            for (int64_t r = 0; r < n; ++r) {
              const int64_t i = i0 + r;
              scalar_t* row = grads_ + r * Lk;
              // rowsum(P * dP) from the block rather than dO . O (flash attention's shortcut): when the softmax
              // saturates, the difference dP - rowsum then cancels between numbers rounded the same way.
              const scalar_t delta = row_dot(probs + r * Lk, row, Lk);
              softmax_grad_row(row, probs + r * Lk, Lk, delta);
              bucket_sum_row(row, Lk, terms, bh, i);
            }
            at::Tensor dqb = dqm.narrow(0, i0, n);
            gemm_into<scalar_t>(dqb, g, km, /*beta=*/0, /*alpha=*/scale);      // dQ = scale dS K
            gemm_into<scalar_t>(dkm, g.t(), qb, /*beta=*/1, /*alpha=*/scale);  // dK += scale dS^T Q
          }
        }
      });
    });
  } else {
    dq.zero_();
  }
  std::vector<at::Tensor> result{dq, dk, dvv};
  result.insert(result.end(), grads.begin(), grads.end());
  return result;
}

}  // namespace
}  // namespace rpe_ops

TORCH_LIBRARY_FRAGMENT(rpe_ops, m) {
  m.def(
      "rpe_attention(Tensor q, Tensor k, Tensor v, Tensor[] tables, Tensor[] indices, int[] transposed, float scale)"
      " -> (Tensor, Tensor)",
      {at::Tag::pt2_compliant_tag});
  m.def(
      "rpe_attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor lse, Tensor[] tables,"
      " Tensor[] indices, int[] transposed, float scale) -> Tensor[]",
      {at::Tag::pt2_compliant_tag});
}

TORCH_LIBRARY_IMPL(rpe_ops, CPU, m) {
  m.impl("rpe_attention", &rpe_ops::rpe_attention_cpu);
  m.impl("rpe_attention_backward", &rpe_ops::rpe_attention_backward_cpu);
}
