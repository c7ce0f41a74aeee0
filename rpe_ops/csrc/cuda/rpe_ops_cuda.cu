// rpe_ops: CUDA kernels of the iRPE lookup primitives.
//
// One warp per row (b, h, i), grid-stride over rows, so any B*H*L fits and the grid is sized to the device.
// rpe_index: lanes read the ids of the row and gather from the (cached) input row; stores are coalesced.
// rpe_bucket_sum: each warp accumulates its row in shared memory (float for half types) and writes the nb sums;
// when nb is too large for shared memory, a fallback accumulates in a zeroed global buffer with atomics. Float
// atomics make the sums' last bits vary between runs: the op alerts under torch.use_deterministic_algorithms(True).
// Bucket ids are checked on the device: an id outside [0, nb) triggers a device-side assert (the failing thread
// neither reads nor writes out of bounds), which surfaces as a RuntimeError at the next synchronisation.
#include <ATen/Context.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <algorithm>
#include <string>
#include <type_traits>

#include "../rpe_ops.h"

namespace rpe_ops {
namespace {

constexpr int kWarpSize = 32;
constexpr int kWarpsPerBlock = 8;
constexpr int kThreads = kWarpSize * kWarpsPerBlock;
constexpr size_t kSharedBytes = 48 * 1024;  // available to every block without opting in

struct RowGeometry {
  int64_t rows, H, Lq, sb, sh, sq, sn;  // sn: stride of the last dim of the input
};

__device__ __forceinline__ int64_t row_offset(const RowGeometry& g, int64_t r, int64_t* i_out) {
  const int64_t i = r % g.Lq;
  const int64_t bh = r / g.Lq;
  *i_out = i;
  return (bh / g.H) * g.sb + (bh % g.H) * g.sh + i * g.sq;
}

template <typename scalar_t, typename index_t>
__global__ void __launch_bounds__(kThreads)
    rpe_index_kernel(const scalar_t* __restrict__ in, const index_t* __restrict__ ids, scalar_t* __restrict__ out,
                     RowGeometry g, int64_t Lk, int64_t nb) {
  const int lane = threadIdx.x % kWarpSize;
  const int64_t warp = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarpSize;
  const int64_t num_warps = static_cast<int64_t>(gridDim.x) * blockDim.x / kWarpSize;
  for (int64_t r = warp; r < g.rows; r += num_warps) {
    int64_t i;
    const scalar_t* src = in + row_offset(g, r, &i);
    const index_t* ix = ids + i * Lk;
    scalar_t* dst = out + r * Lk;
    for (int64_t j = lane; j < Lk; j += kWarpSize) {
      const int64_t k = static_cast<int64_t>(ix[j]);
      const bool ok = k >= 0 && k < nb;
      CUDA_KERNEL_ASSERT_MSG(ok, "rpe_ops::rpe_index: bucket id out of range [0, input.size(3))");
      dst[j] = ok ? src[k * g.sn] : scalar_t(0);
    }
  }
}

// Shared-memory accumulation: warp w of the block owns acc[w * nb, (w + 1) * nb).
template <typename scalar_t, typename index_t>
__global__ void __launch_bounds__(kThreads)
    rpe_bucket_sum_shared_kernel(const scalar_t* __restrict__ in, const index_t* __restrict__ ids,
                                 scalar_t* __restrict__ out, RowGeometry g, int64_t Lk, int64_t nb) {
  using acc_t = at::opmath_type<scalar_t>;
  extern __shared__ __align__(sizeof(double)) unsigned char shared_raw[];
  acc_t* acc = reinterpret_cast<acc_t*>(shared_raw) + (threadIdx.x / kWarpSize) * nb;
  const int lane = threadIdx.x % kWarpSize;
  const int64_t warp = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarpSize;
  const int64_t num_warps = static_cast<int64_t>(gridDim.x) * blockDim.x / kWarpSize;
  for (int64_t r = warp; r < g.rows; r += num_warps) {
    int64_t i;
    const scalar_t* src = in + row_offset(g, r, &i);
    const index_t* ix = ids + i * Lk;
    for (int64_t k = lane; k < nb; k += kWarpSize) {
      acc[k] = acc_t(0);
    }
    __syncwarp();
    for (int64_t j = lane; j < Lk; j += kWarpSize) {
      const int64_t k = static_cast<int64_t>(ix[j]);
      const bool ok = k >= 0 && k < nb;
      CUDA_KERNEL_ASSERT_MSG(ok, "rpe_ops::rpe_bucket_sum: bucket id out of range [0, num_buckets)");
      if (ok) {
        atomicAdd(acc + k, static_cast<acc_t>(src[j * g.sn]));
      }
    }
    __syncwarp();
    scalar_t* dst = out + r * nb;
    for (int64_t k = lane; k < nb; k += kWarpSize) {
      dst[k] = static_cast<scalar_t>(acc[k]);
    }
    __syncwarp();
  }
}

// Fallback for a number of buckets beyond shared memory: atomics into a zeroed global (rows, nb) buffer of acc_t.
template <typename scalar_t, typename index_t>
__global__ void __launch_bounds__(kThreads)
    rpe_bucket_sum_global_kernel(const scalar_t* __restrict__ in, const index_t* __restrict__ ids,
                                 at::opmath_type<scalar_t>* __restrict__ acc, RowGeometry g, int64_t Lk, int64_t nb) {
  using acc_t = at::opmath_type<scalar_t>;
  const int lane = threadIdx.x % kWarpSize;
  const int64_t warp = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarpSize;
  const int64_t num_warps = static_cast<int64_t>(gridDim.x) * blockDim.x / kWarpSize;
  for (int64_t r = warp; r < g.rows; r += num_warps) {
    int64_t i;
    const scalar_t* src = in + row_offset(g, r, &i);
    const index_t* ix = ids + i * Lk;
    acc_t* dst = acc + r * nb;
    for (int64_t j = lane; j < Lk; j += kWarpSize) {
      const int64_t k = static_cast<int64_t>(ix[j]);
      const bool ok = k >= 0 && k < nb;
      CUDA_KERNEL_ASSERT_MSG(ok, "rpe_ops::rpe_bucket_sum: bucket id out of range [0, num_buckets)");
      if (ok) {
        atomicAdd(dst + k, static_cast<acc_t>(src[j * g.sn]));
      }
    }
  }
}

RowGeometry geometry(const at::Tensor& input) {
  return RowGeometry{input.size(0) * input.size(1) * input.size(2),
                     input.size(1),
                     input.size(2),
                     input.stride(0),
                     input.stride(1),
                     input.stride(2),
                     input.stride(3)};
}

// Enough blocks to cover every row with one warp, capped at a few waves of resident blocks on this device; the
// kernels grid-stride over the remaining rows.
int64_t num_blocks(int64_t rows, int warps_per_block) {
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, c10::cuda::current_device()));
  const int64_t needed = (rows + warps_per_block - 1) / warps_per_block;
  const int64_t cap = static_cast<int64_t>(std::max(sms, 1)) * 32;
  return std::max<int64_t>(1, std::min(needed, cap));
}

void check_cuda_inputs(const char* op, const at::Tensor& input, const at::Tensor& index, int64_t nb) {
  check_common(op, input, index, nb);
  TORCH_CHECK(input.is_cuda(), op, ": CUDA kernel called with input on ", input.device());
}

at::Tensor rpe_index_cuda(const at::Tensor& input, const at::Tensor& index) {
  constexpr const char* op = "rpe_ops::rpe_index";
  check_cuda_inputs(op, input, index, input.dim() == 4 ? input.size(3) : 0);
  const c10::cuda::CUDAGuard guard(input.device());
  const at::Tensor idx = index.contiguous();
  const int64_t nb = input.size(3);
  const int64_t Lk = idx.size(1);
  at::Tensor out = at::empty({input.size(0), input.size(1), input.size(2), Lk}, input.options());
  if (out.numel() == 0) {
    return out;
  }
  const RowGeometry g = geometry(input);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const auto blocks = static_cast<unsigned>(num_blocks(g.rows, kWarpsPerBlock));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "rpe_index_cuda", [&] {
    AT_DISPATCH_INDEX_TYPES(idx.scalar_type(), "rpe_index_cuda", [&] {
      rpe_index_kernel<scalar_t, index_t><<<blocks, kThreads, 0, stream>>>(
          input.const_data_ptr<scalar_t>(), idx.const_data_ptr<index_t>(), out.mutable_data_ptr<scalar_t>(), g, Lk,
          nb);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return out;
}

at::Tensor rpe_bucket_sum_cuda(const at::Tensor& input, const at::Tensor& index, int64_t num_buckets) {
  constexpr const char* op = "rpe_ops::rpe_bucket_sum";
  check_cuda_inputs(op, input, index, num_buckets);
  TORCH_CHECK(input.size(3) == index.size(1), op, ": expected input.size(3) == index.size(1) (L_key), got input ",
              input.sizes(), " and index ", index.sizes());
  // The sums add with float atomics, in an order that varies between runs: alert as PyTorch's own scatter_add does
  // under torch.use_deterministic_algorithms(True) (an error, or a warning with warn_only=True).
  at::globalContext().alertNotDeterministic("rpe_ops::rpe_bucket_sum (CUDA)");
  const c10::cuda::CUDAGuard guard(input.device());
  const at::Tensor idx = index.contiguous();
  const int64_t nb = num_buckets;
  const int64_t Lk = idx.size(1);
  at::Tensor out = at::empty({input.size(0), input.size(1), input.size(2), nb}, input.options());
  if (out.numel() == 0) {
    return out;
  }
  const RowGeometry g = geometry(input);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "rpe_bucket_sum_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const size_t row_bytes = static_cast<size_t>(nb) * sizeof(acc_t);
    const int warps = static_cast<int>(std::min<size_t>(kWarpsPerBlock, kSharedBytes / row_bytes));
    AT_DISPATCH_INDEX_TYPES(idx.scalar_type(), "rpe_bucket_sum_cuda", [&] {
      if (warps > 0) {
        const auto blocks = static_cast<unsigned>(num_blocks(g.rows, warps));
        rpe_bucket_sum_shared_kernel<scalar_t, index_t><<<blocks, warps * kWarpSize, warps * row_bytes, stream>>>(
            input.const_data_ptr<scalar_t>(), idx.const_data_ptr<index_t>(), out.mutable_data_ptr<scalar_t>(), g,
            Lk, nb);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      } else {
        at::Tensor acc = std::is_same_v<acc_t, scalar_t>
                             ? out.zero_()
                             : at::zeros(out.sizes(), out.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
        const auto blocks = static_cast<unsigned>(num_blocks(g.rows, kWarpsPerBlock));
        rpe_bucket_sum_global_kernel<scalar_t, index_t><<<blocks, kThreads, 0, stream>>>(
            input.const_data_ptr<scalar_t>(), idx.const_data_ptr<index_t>(), acc.mutable_data_ptr<acc_t>(), g, Lk,
            nb);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        if (!std::is_same_v<acc_t, scalar_t>) {
          out.copy_(acc);
        }
      }
    });
  });
  return out;
}

}  // namespace

// __CUDA_ARCH_LIST__ expands to a comma-separated list such as 750,800,860,900.
#define RPE_OPS_STR2(...) #__VA_ARGS__
#define RPE_OPS_STR(...) RPE_OPS_STR2(__VA_ARGS__)

std::string cuda_build_info() {
  std::string info = "cuda_runtime=" + std::to_string(CUDART_VERSION / 1000) + "." +
                     std::to_string((CUDART_VERSION % 1000) / 10);
#ifdef __CUDA_ARCH_LIST__
  info += ";archs=" RPE_OPS_STR(__CUDA_ARCH_LIST__);
#endif
#ifdef RPE_OPS_PTX_MIN
  info += ";ptx=" RPE_OPS_STR(RPE_OPS_PTX_MIN);  // lowest architecture also compiled to PTX (setup.py)
#endif
  return info;
}

}  // namespace rpe_ops

TORCH_LIBRARY_IMPL(rpe_ops, CUDA, m) {
  m.impl("rpe_index", &rpe_ops::rpe_index_cuda);
  m.impl("rpe_bucket_sum", &rpe_ops::rpe_bucket_sum_cuda);
}
