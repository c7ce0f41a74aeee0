// Shared declarations of the rpe_ops extension: argument checks used by the CPU and CUDA kernels.
//
//   rpe_index(input (B,H,Lq,nb), index (Lq,Lk))          -> (B,H,Lq,Lk)  out[b,h,i,j] = input[b,h,i,index[i,j]]
//   rpe_bucket_sum(input (B,H,Lq,Lk), index (Lq,Lk), nb) -> (B,H,Lq,nb)  out[b,h,i,k] = sum_{j: index[i,j]==k} input[b,h,i,j]
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <string>

namespace rpe_ops {

// Checks device agreement, dtypes, ranks and sizes shared by both ops (not the index values).
// `op` names the operator in the messages; `num_buckets` is the number of valid ids (input.size(3) for rpe_index).
void check_common(const char* op, const at::Tensor& input, const at::Tensor& index, int64_t num_buckets);

// Host-side check that every id of a (contiguous, CPU) index lies in [0, num_buckets).
void check_index_range_cpu(const char* op, const at::Tensor& index, int64_t num_buckets);

#ifdef RPE_OPS_WITH_CUDA
// CUDA runtime version and architecture list the CUDA kernels were compiled for (defined in cuda/rpe_ops_cuda.cu).
std::string cuda_build_info();
#endif

}  // namespace rpe_ops
