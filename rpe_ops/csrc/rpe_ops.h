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

// The instruction-set level whose variant of the CPU attention kernel's element-wise loops runs: the best the CPU
// supports, capped as PyTorch caps its own kernels (ATEN_CPU_CAPABILITY=avx512|avx2|default); chosen once per
// process. Defined in rpe_attention_cpu.cpp.
enum class CpuIsa { kBaseline = 0, kX86_64_V3 = 1, kX86_64_V4 = 2 };
CpuIsa cpu_isa();
const char* cpu_isa_name();  // "x86-64-v4", "x86-64-v3" or "baseline"

#ifdef RPE_OPS_WITH_CUDA
// CUDA runtime version and architecture list the CUDA kernels were compiled for (defined in cuda/rpe_ops_cuda.cu).
std::string cuda_build_info();
#endif

}  // namespace rpe_ops
