// rpe_ops: operator schemas, argument checks and CPU kernels of the iRPE lookup primitives.
//
// Both ops work row by row: a row is one (b, h, i) triple, rows are independent, so the CPU kernels split the rows
// between threads with at::parallel_for and never need atomics. The bucket ids are validated on the host before any
// memory is touched, so an out-of-range id raises instead of reading or writing out of bounds.
#include <Python.h>

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/irange.h>
#include <torch/headeronly/version.h>
#include <torch/library.h>

#include <algorithm>
#include <string>
#include <vector>

#include "rpe_ops.h"

namespace rpe_ops {

// ---------------------------------------------------------------------------------------------------------------------
// Checks

void check_common(const char* op, const at::Tensor& input, const at::Tensor& index, int64_t num_buckets) {
  TORCH_CHECK(input.device() == index.device(), op, ": expected input and index on the same device, got input on ",
              input.device(), " and index on ", index.device());
  const auto dtype = input.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16, op,
              ": expected input of dtype float32, float64, float16 or bfloat16, got ", dtype);
  TORCH_CHECK(index.scalar_type() == at::kLong || index.scalar_type() == at::kInt, op,
              ": expected index of dtype int64 or int32, got ", index.scalar_type());
  TORCH_CHECK(input.dim() == 4, op, ": expected a 4-D input (B, H, L_query, ...), got ", input.dim(),
              "-D input of shape ", input.sizes());
  TORCH_CHECK(index.dim() == 2, op, ": expected a 2-D index (L_query, L_key), got ", index.dim(),
              "-D index of shape ", index.sizes());
  TORCH_CHECK(input.size(2) == index.size(0), op, ": expected input.size(2) == index.size(0) (L_query), got input ",
              input.sizes(), " and index ", index.sizes());
  TORCH_CHECK(num_buckets >= 0, op, ": expected num_buckets >= 0, got ", num_buckets);
}

namespace {

template <typename index_t>
void check_range_impl(const char* op, const index_t* ids, int64_t n, int64_t num_buckets) {
  index_t lo = ids[0];
  index_t hi = ids[0];
  for (int64_t t = 1; t < n; ++t) {
    lo = std::min(lo, ids[t]);
    hi = std::max(hi, ids[t]);
  }
  TORCH_CHECK(lo >= 0 && static_cast<int64_t>(hi) < num_buckets, op, ": bucket ids must lie in [0, ", num_buckets,
              "), got ids from ", static_cast<int64_t>(lo), " to ", static_cast<int64_t>(hi));
}

}  // namespace

void check_index_range_cpu(const char* op, const at::Tensor& index, int64_t num_buckets) {
  const int64_t n = index.numel();
  if (n == 0) {
    return;
  }
  if (index.scalar_type() == at::kLong) {
    check_range_impl(op, index.const_data_ptr<int64_t>(), n, num_buckets);
  } else {
    check_range_impl(op, index.const_data_ptr<int32_t>(), n, num_buckets);
  }
}

// ---------------------------------------------------------------------------------------------------------------------
// CPU kernels

namespace {

// Rows handed to one thread at a time hold at least this many elements.
constexpr int64_t kGrainElements = 32768;
// Buckets up to this count use kLanes interleaved accumulators per row, which breaks the store-to-load dependency
// chain when consecutive keys fall into the same bucket (common: far keys share the clipped buckets).
constexpr int64_t kMaxLaneBuckets = 1024;
constexpr int64_t kLanes = 4;

// Strides of the first three dims of a 4-D tensor, and the row walker shared by both kernels.
struct RowWalker {
  int64_t H, Lq, sb, sh, sq;
  int64_t b = 0, h = 0, i = 0;

  void seek(int64_t row) {
    i = row % Lq;
    const int64_t bh = row / Lq;
    h = bh % H;
    b = bh / H;
  }
  int64_t offset() const { return b * sb + h * sh + i * sq; }
  void next() {
    if (++i == Lq) {
      i = 0;
      if (++h == H) {
        h = 0;
        ++b;
      }
    }
  }
};

template <typename scalar_t, typename index_t>
void rpe_index_cpu_kernel(const at::Tensor& input, const at::Tensor& index, at::Tensor& out) {
  const int64_t Lk = index.size(1);
  const int64_t rows = out.numel() / Lk;
  const int64_t sn = input.stride(3);
  const scalar_t* in = input.const_data_ptr<scalar_t>();
  const index_t* ids = index.const_data_ptr<index_t>();
  scalar_t* dst_base = out.mutable_data_ptr<scalar_t>();
  const RowWalker proto{input.size(1), input.size(2), input.stride(0), input.stride(1), input.stride(2)};

  at::parallel_for(0, rows, std::max<int64_t>(1, kGrainElements / Lk), [&](int64_t r0, int64_t r1) {
    RowWalker w = proto;
    w.seek(r0);
    for (int64_t r = r0; r < r1; ++r, w.next()) {
      const scalar_t* __restrict__ src = in + w.offset();
      const index_t* __restrict__ ix = ids + w.i * Lk;
      scalar_t* __restrict__ dst = dst_base + r * Lk;
      if (sn == 1) {
        for (int64_t j = 0; j < Lk; ++j) {
          dst[j] = src[ix[j]];
        }
      } else {
        for (int64_t j = 0; j < Lk; ++j) {
          dst[j] = src[static_cast<int64_t>(ix[j]) * sn];
        }
      }
    }
  });
}

// Sums one row of Lk values into `acc` (zeroed by the caller) using kLanes interleaved accumulator arrays of nb
// entries each; lane l takes the keys j with j % kLanes == l.
template <typename acc_t, typename scalar_t, typename index_t>
inline void scatter_row_lanes(acc_t* __restrict__ acc, const scalar_t* __restrict__ src, int64_t sk,
                              const index_t* __restrict__ ix, int64_t Lk, int64_t nb) {
  acc_t* __restrict__ a0 = acc;
  acc_t* __restrict__ a1 = acc + nb;
  acc_t* __restrict__ a2 = acc + 2 * nb;
  acc_t* __restrict__ a3 = acc + 3 * nb;
  int64_t j = 0;
  if (sk == 1) {
    for (; j + kLanes <= Lk; j += kLanes) {
      a0[ix[j]] += static_cast<acc_t>(src[j]);
      a1[ix[j + 1]] += static_cast<acc_t>(src[j + 1]);
      a2[ix[j + 2]] += static_cast<acc_t>(src[j + 2]);
      a3[ix[j + 3]] += static_cast<acc_t>(src[j + 3]);
    }
  }
  for (; j < Lk; ++j) {
    a0[ix[j]] += static_cast<acc_t>(src[j * sk]);
  }
}

template <typename scalar_t, typename index_t>
void rpe_bucket_sum_cpu_kernel(const at::Tensor& input, const at::Tensor& index, int64_t nb, at::Tensor& out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t Lk = input.size(3);
  const int64_t rows = input.size(0) * input.size(1) * input.size(2);
  const int64_t sk = input.stride(3);
  const scalar_t* in = input.const_data_ptr<scalar_t>();
  const index_t* ids = index.const_data_ptr<index_t>();
  scalar_t* dst_base = out.mutable_data_ptr<scalar_t>();
  const RowWalker proto{input.size(1), input.size(2), input.stride(0), input.stride(1), input.stride(2)};
  const int64_t lanes = nb <= kMaxLaneBuckets ? kLanes : 1;
  const int64_t grain = std::max<int64_t>(1, kGrainElements / std::max<int64_t>(Lk + nb, 1));

  at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
    std::vector<acc_t> acc(lanes * nb);
    RowWalker w = proto;
    w.seek(r0);
    for (int64_t r = r0; r < r1; ++r, w.next()) {
      const scalar_t* src = in + w.offset();
      const index_t* ix = ids + w.i * Lk;
      scalar_t* __restrict__ dst = dst_base + r * nb;
      std::fill(acc.begin(), acc.end(), acc_t(0));
      if (lanes == kLanes) {
        scatter_row_lanes(acc.data(), src, sk, ix, Lk, nb);
        const acc_t* a = acc.data();
        for (int64_t k = 0; k < nb; ++k) {
          dst[k] = static_cast<scalar_t>((a[k] + a[nb + k]) + (a[2 * nb + k] + a[3 * nb + k]));
        }
      } else {
        acc_t* a = acc.data();
        for (int64_t j = 0; j < Lk; ++j) {
          a[ix[j]] += static_cast<acc_t>(src[j * sk]);
        }
        for (int64_t k = 0; k < nb; ++k) {
          dst[k] = static_cast<scalar_t>(a[k]);
        }
      }
    }
  });
}

// Last-dim contiguity is what the inner loops like; other strides (including 0 from expand) are walked in place.
at::Tensor rows_input(const at::Tensor& input) { return input.stride(3) == 1 || input.size(3) <= 1 ? input : input.contiguous(); }

at::Tensor rpe_index_cpu(const at::Tensor& input, const at::Tensor& index) {
  constexpr const char* op = "rpe_ops::rpe_index";
  check_common(op, input, index, input.dim() == 4 ? input.size(3) : 0);
  TORCH_CHECK(input.device().is_cpu(), op, ": CPU kernel called with input on ", input.device());
  const at::Tensor idx = index.contiguous();
  const int64_t nb = input.size(3);
  check_index_range_cpu(op, idx, nb);
  at::Tensor out = at::empty({input.size(0), input.size(1), input.size(2), idx.size(1)}, input.options());
  if (out.numel() == 0) {
    return out;
  }
  const at::Tensor in = rows_input(input);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.scalar_type(), "rpe_index_cpu", [&] {
    AT_DISPATCH_INDEX_TYPES(idx.scalar_type(), "rpe_index_cpu",
                            [&] { rpe_index_cpu_kernel<scalar_t, index_t>(in, idx, out); });
  });
  return out;
}

at::Tensor rpe_bucket_sum_cpu(const at::Tensor& input, const at::Tensor& index, int64_t num_buckets) {
  constexpr const char* op = "rpe_ops::rpe_bucket_sum";
  check_common(op, input, index, num_buckets);
  TORCH_CHECK(input.device().is_cpu(), op, ": CPU kernel called with input on ", input.device());
  TORCH_CHECK(input.size(3) == index.size(1), op, ": expected input.size(3) == index.size(1) (L_key), got input ",
              input.sizes(), " and index ", index.sizes());
  const at::Tensor idx = index.contiguous();
  check_index_range_cpu(op, idx, num_buckets);
  at::Tensor out = at::empty({input.size(0), input.size(1), input.size(2), num_buckets}, input.options());
  if (out.numel() == 0) {
    return out;
  }
  const at::Tensor in = rows_input(input);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.scalar_type(), "rpe_bucket_sum_cpu", [&] {
    AT_DISPATCH_INDEX_TYPES(idx.scalar_type(), "rpe_bucket_sum_cpu",
                            [&] { rpe_bucket_sum_cpu_kernel<scalar_t, index_t>(in, idx, num_buckets, out); });
  });
  return out;
}

}  // namespace
}  // namespace rpe_ops

// ---------------------------------------------------------------------------------------------------------------------
// Registration. Fake (meta) kernels and autograd are registered from Python (rpe_ops/__init__.py).

TORCH_LIBRARY(rpe_ops, m) {
  m.def("rpe_index(Tensor input, Tensor index) -> Tensor", {at::Tag::pt2_compliant_tag});
  m.def("rpe_bucket_sum(Tensor input, Tensor index, int num_buckets) -> Tensor", {at::Tag::pt2_compliant_tag});
}

TORCH_LIBRARY_IMPL(rpe_ops, CPU, m) {
  m.impl("rpe_index", &rpe_ops::rpe_index_cpu);
  m.impl("rpe_bucket_sum", &rpe_ops::rpe_bucket_sum_cpu);
}

// ---------------------------------------------------------------------------------------------------------------------
// Python module `rpe_ops._C`: importing it loads the library (and so registers the ops); its constants describe the
// build.

namespace {

#define RPE_OPS_STR2(x) #x
#define RPE_OPS_STR(x) RPE_OPS_STR2(x)

PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT,
    "_C",
    "Compiled iRPE lookup operators; importing this module registers torch.ops.rpe_ops.*.",
    -1,
    nullptr,
};

}  // namespace

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* m = PyModule_Create(&module_def);
  if (m == nullptr) {
    return nullptr;
  }
  const char* torch_version =
      RPE_OPS_STR(TORCH_VERSION_MAJOR) "." RPE_OPS_STR(TORCH_VERSION_MINOR) "." RPE_OPS_STR(TORCH_VERSION_PATCH);
#ifdef RPE_OPS_WITH_CUDA
  const std::string cuda_info = rpe_ops::cuda_build_info();
  const int with_cuda = 1;
#else
  const std::string cuda_info;
  const int with_cuda = 0;
#endif
#ifdef RPE_OPS_CPU_ONLY
  const int cpu_only = RPE_OPS_CPU_ONLY;  // why setup.py left the CUDA kernels out (its CPU_ONLY_REASONS)
#else
  const int cpu_only = 0;
#endif
  if (PyModule_AddStringConstant(m, "torch_version", torch_version) != 0 ||
      PyModule_AddIntConstant(m, "with_cuda", with_cuda) != 0 ||
      PyModule_AddStringConstant(m, "cuda_info", cuda_info.c_str()) != 0 ||
      PyModule_AddStringConstant(m, "cpu_isa", rpe_ops::cpu_isa_name()) != 0 ||
      PyModule_AddIntConstant(m, "cpu_only_reason", cpu_only) != 0) {
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}
