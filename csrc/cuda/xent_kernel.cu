// CUDA kernels for torch_xent::cross_entropy_forward(_inplace). Design notes: docs/cuda.md.
//
// One launch reads each row of logits once: an online max / sum-exp pass that also keeps the row
// on chip (shared memory), then the gradient is written from that copy. Rows too large for one
// block's shared memory read their logits a second time for the gradient. An opt-in path
// (TORCH_XENT_CUDA_MAX_CLUSTER > 1, sm_90 only) splits such rows over a thread-block cluster whose
// blocks exchange partial sums through distributed shared memory; it is off by default because it
// has not been run on hardware yet (docs/cuda.md says what was validated).
//
// Reductions are deterministic: fixed-order trees in every kernel, per-row losses in a buffer that
// a single block sums, and no floating-point atomics. The mean's denominator is computed on the
// device by a first tiny kernel that the row kernel reads: nothing waits for the host.
//
// Only c10 CUDA headers are included (ATen/cuda/CUDAContext.h would pull in cuBLAS headers that a
// bare CUDA toolkit may not have).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <map>
#include <mutex>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "xent_checks.h"
#include "xent_math.h"
#include "xent_positions.cuh"
#include "xent_rows.cuh"

namespace torch_xent {
namespace {

// Each thread keeps kUnroll independent 16-byte loads in flight before it uses the first.
constexpr int kUnroll = 4;
// Block size of the kernel that handles several short rows per block (a group of threads a row).
constexpr int kGroupBlockThreads = 256;
// Largest block of the block-per-row kernel; its launch bounds leave 64 registers a thread.
constexpr int kMaxRowBlockThreads = 256;
// A row (or a cluster block's share of it) is kept in shared memory up to this many bytes a
// block: three such blocks fit in a Hopper SM, so one block's loads overlap another's stores.
constexpr int64_t kTargetChunkBytes = 64 * 1024;
// Portable cluster size limit (the opt-in cluster path; the default is 1: no clusters).
constexpr int kMaxCluster = 8;
// Rows of at most this many 16-byte slots go to the several-rows-per-block kernel.
constexpr int64_t kGroupMaxSlots = 128;

// ---------------------------------------------------------------------------------------------
// Element types: torch's c10::Half / c10::BFloat16 are handled as CUDA's own __half / bf16.
template <typename T> struct CudaType { using type = T; };
template <> struct CudaType<c10::Half> { using type = __half; };
template <> struct CudaType<c10::BFloat16> { using type = __nv_bfloat16; };

using namespace rows;

template <typename acc_t>
__device__ __forceinline__ Stats<acc_t> shfl_xor(const Stats<acc_t>& v, int offset, unsigned mask, int width) {
  return {__shfl_xor_sync(mask, v.m, offset, width), __shfl_xor_sync(mask, v.s, offset, width),
          __shfl_xor_sync(mask, v.dot, offset, width), __shfl_xor_sync(mask, v.qsum, offset, width),
          __shfl_xor_sync(mask, v.zy, offset, width)};
}

template <typename acc_t>
__device__ __forceinline__ Stats<acc_t> group_allreduce(Stats<acc_t> v, unsigned mask, int width) {
  for (int offset = width / 2; offset > 0; offset /= 2) v = combine(v, shfl_xor(v, offset, mask, width));
  return v;
}

// ---------------------------------------------------------------------------------------------
// Several short rows per block: a group of 2^log2_tpr threads (at most a warp) per row.
template <typename T, typename acc_t, int MODE>
__global__ void __launch_bounds__(kGroupBlockThreads, 3) xent_rows_group_kernel(const RowParams<T, acc_t> p,
                                                                              const int log2_tpr) {
  extern __shared__ uint4 smem[];
  const int tpr = 1 << log2_tpr;
  const int group = threadIdx.x >> log2_tpr;
  const int lane = threadIdx.x & (tpr - 1);
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (blockDim.x >> log2_tpr) + group;
  if (row >= p.M) return;
  // Shuffles involve only this group's lanes: other groups of the warp may be on other branches.
  const unsigned mask = tpr == 32 ? 0xffffffffu : ((1u << tpr) - 1u) << ((threadIdx.x & 31) & ~(tpr - 1));
  uint4* cache = p.cache ? smem + static_cast<int64_t>(group) * p.chunk_slots : nullptr;
  process_row<T, acc_t, MODE>(p, row, 0, lane, tpr, cache,
                              [&](const Stats<acc_t>& s) { return group_allreduce(s, mask, tpr); });
}

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
__device__ __forceinline__ void cluster_arrive() { asm volatile("barrier.cluster.arrive.release.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void cluster_wait() { asm volatile("barrier.cluster.wait.acquire.aligned;\n" ::: "memory"); }
#endif

// One block per row, or (p.cluster > 1, sm_90 only) a cluster of blocks per row, block `rank`
// owning the rank-th share of the row's slots.
template <typename T, typename acc_t, int MODE>
__global__ void __launch_bounds__(kMaxRowBlockThreads, 4) xent_rows_block_kernel(const RowParams<T, acc_t> p) {
  extern __shared__ uint4 smem[];
  __shared__ Stats<acc_t> warp_stats[kMaxRowBlockThreads / 32];
  __shared__ Stats<acc_t> block_stats;
  __shared__ Stats<acc_t> row_stats;
  const int nchunks = p.cluster;
  const int64_t row = blockIdx.x / nchunks;
  const int rank = static_cast<int>(blockIdx.x % nchunks);
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ < 900
  if (nchunks > 1) __trap();  // the host launches clusters only for sm_90 binaries
#endif
  bool clustered = false;
  auto reduce = [&](Stats<acc_t> s) {
    const int warp = threadIdx.x / 32;
    const int nwarps = (blockDim.x + 31) / 32;
    s = group_allreduce(s, 0xffffffffu, 32);
    if ((threadIdx.x & 31) == 0) warp_stats[warp] = s;
    __syncthreads();
    Stats<acc_t> b = warp_stats[0];
    for (int w = 1; w < nwarps; ++w) b = combine(b, warp_stats[w]);
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    if (nchunks > 1) {
      namespace cg = cooperative_groups;
      cg::cluster_group cluster = cg::this_cluster();
      if (threadIdx.x == 0) block_stats = b;
      cluster_arrive();  // publishes block_stats to the cluster ...
      cluster_wait();    // ... and waits for every block's
      if (threadIdx.x == 0) {
        Stats<acc_t> a = *cluster.map_shared_rank(&block_stats, 0);
        for (int k = 1; k < nchunks; ++k) a = combine(a, *cluster.map_shared_rank(&block_stats, k));
        row_stats = a;
      }
      // Done reading the other blocks' shared memory; the matching wait is at the end of the
      // kernel, so that no block exits while another may still read it.
      cluster_arrive();
      clustered = true;
      __syncthreads();
      b = row_stats;
    }
#endif
    return b;
  };
  process_row<T, acc_t, MODE>(p, row, rank, threadIdx.x, blockDim.x, p.cache ? smem : nullptr, reduce);
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if (clustered) cluster_wait();
#else
  (void)clustered;
#endif
}

// ---------------------------------------------------------------------------------------------
// K-dimensional input in its own layout, (N, C, S) logits: a thread a position
// (xent_positions.cuh), consecutive threads on consecutive positions, so each class's loads and
// stores are contiguous across a warp.
constexpr int kPositionThreads = 256;

template <typename T, typename acc_t, int MODE>
__global__ void __launch_bounds__(kPositionThreads) xent_positions_kernel(const RowParams<T, acc_t> p,
                                                                         const int64_t S) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kPositionThreads + threadIdx.x;
  if (row < p.M) process_position<T, acc_t, MODE>(p, S, row);
}

// ---------------------------------------------------------------------------------------------
// Single-block, fixed-order reductions (deterministic; no atomics).

template <typename acc_t, int kThreads>
__device__ __forceinline__ acc_t block_sum(acc_t v) {
  __shared__ acc_t partial[kThreads / 32];
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  if ((threadIdx.x & 31) == 0) partial[threadIdx.x / 32] = v;
  __syncthreads();
  acc_t total = acc_t(0);
  for (int w = 0; w < kThreads / 32; ++w) total += partial[w];
  return total;
}

constexpr int kReduceThreads = 512;

// The mean's gradient scale for class targets: 1 / sum over counted rows of w[y] (their count
// without weights). Out-of-range rows are left out (their w[y] cannot be read; they are NaN anyway).
template <typename T, typename acc_t>
__global__ void __launch_bounds__(kReduceThreads) xent_mean_scale_kernel(const int64_t* target, const T* weight,
                                                                         int64_t M, int64_t C, int64_t ignore_index,
                                                                         acc_t* scale) {
  acc_t sum = acc_t(0);
  for (int64_t i = threadIdx.x; i < M; i += kReduceThreads) {
    const int64_t y = target[i];
    if (y != ignore_index && y >= 0 && y < C) sum += weight != nullptr ? to_acc(weight[y]) : acc_t(1);
  }
  const acc_t total = block_sum<acc_t, kReduceThreads>(sum);
  if (threadIdx.x == 0) *scale = acc_t(1) / total;  // 0 counted rows: inf, and the loss 0 * inf = NaN
}

template <typename acc_t>
__global__ void __launch_bounds__(kReduceThreads) xent_sum_loss_kernel(const acc_t* row_loss, int64_t M,
                                                                       const acc_t* scale_ptr, acc_t scale,
                                                                       acc_t* out) {
  acc_t sum = acc_t(0);
  for (int64_t i = threadIdx.x; i < M; i += kReduceThreads) sum += row_loss[i];
  const acc_t total = block_sum<acc_t, kReduceThreads>(sum);
  if (threadIdx.x == 0) *out = total * (scale_ptr != nullptr ? *scale_ptr : scale);
}

// ---------------------------------------------------------------------------------------------
// Host side.

struct DeviceInfo {
  int major = 0;
  int max_smem_optin = 48 * 1024;
};

DeviceInfo device_info(int device) {
  static std::mutex mutex;
  static std::array<DeviceInfo, 64> cache;
  static std::array<bool, 64> known{};
  std::lock_guard<std::mutex> lock(mutex);
  if (device >= 0 && device < 64 && known[device]) return cache[device];
  DeviceInfo info;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&info.major, cudaDevAttrComputeCapabilityMajor, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&info.max_smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  if (device >= 0 && device < 64) {
    cache[device] = info;
    known[device] = true;
  }
  return info;
}

// What the loaded binary of `kernel` was compiled for on `device` (e.g. 90), after letting it use up
// to `smem` bytes of dynamic shared memory. Cached per kernel and device (kernels of one signature
// share a function-pointer type, so the key is the pointer itself).
int prepare_kernel(const void* kernel, int device, int smem) {
  struct Entry {
    int binary = 0;
    int smem_set = 0;
  };
  static std::mutex mutex;
  static std::map<std::pair<const void*, int>, Entry> cache;
  std::lock_guard<std::mutex> lock(mutex);
  Entry& entry = cache[{kernel, device}];
  if (entry.binary == 0) {
    cudaFuncAttributes attr;
    C10_CUDA_CHECK(cudaFuncGetAttributes(&attr, kernel));
    entry.binary = attr.binaryVersion;
  }
  if (smem > 48 * 1024 && smem > entry.smem_set) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
    entry.smem_set = smem;
  }
  return entry.binary;
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Tuning and testing knobs, read at each call (documented in docs/cuda.md):
//   TORCH_XENT_CUDA_CHUNK_KB     bytes of a row one block keeps in shared memory before a row is
//                                split over a cluster (default 64)
//   TORCH_XENT_CUDA_MAX_CLUSTER  largest cluster, up to 8 (default 1: no clusters; the cluster
//                                path is opt-in until it has been validated on a Hopper GPU)
//   TORCH_XENT_CUDA_CACHE        0 makes the gradient pass re-read the logits instead of keeping
//                                them on chip (the path of rows too large for shared memory)
int64_t env_int(const char* name, int64_t fallback, int64_t lo, int64_t hi) {
  const char* v = std::getenv(name);
  if (v == nullptr || *v == '\0') return fallback;
  char* end = nullptr;
  const long long parsed = std::strtoll(v, &end, 10);
  if (end == v) return fallback;
  return std::min<int64_t>(hi, std::max<int64_t>(lo, parsed));
}

int pow2_at_least(int64_t v) {
  int p = 1;
  while (p < v) p *= 2;
  return p;
}

int pow2_at_most(int64_t v) {
  int p = 1;
  while (p * 2 <= v) p *= 2;
  return p;
}

template <typename T, typename acc_t, int MODE>
void launch_rows(RowParams<T, acc_t> p, int device, cudaStream_t stream) {
  constexpr int kVec = Pack<T>::kVec;
  const DeviceInfo info = device_info(device);
  const bool has_grad = p.grad != nullptr;
  // Slots a row can span whatever its misalignment.
  const int64_t row_slots = ceil_div(p.C + kVec - 1, kVec);

  if (row_slots <= kGroupMaxSlots) {
    // Short rows: a group of threads per row, about four slots a thread, several rows a block.
    const int tpr = std::min(32, pow2_at_least(ceil_div(row_slots, kUnroll)));
    int log2_tpr = 0;
    while ((1 << log2_tpr) < tpr) ++log2_tpr;
    const int rows_per_block = kGroupBlockThreads / tpr;
    p.chunk_slots = static_cast<int>(row_slots);
    p.cluster = 1;
    p.cache = has_grad;
    const int smem = has_grad ? static_cast<int>(rows_per_block * row_slots * 16) : 0;
    auto kernel = xent_rows_group_kernel<T, acc_t, MODE>;
    prepare_kernel(reinterpret_cast<const void*>(kernel), device, smem);
    const int64_t blocks = ceil_div(p.M, rows_per_block);
    TORCH_CHECK(blocks < std::numeric_limits<int32_t>::max(), "torch_xent: too many rows for one launch (", p.M, ")");
    kernel<<<static_cast<unsigned>(blocks), kGroupBlockThreads, smem, stream>>>(p, log2_tpr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }

  auto kernel = xent_rows_block_kernel<T, acc_t, MODE>;
  const int binary = prepare_kernel(reinterpret_cast<const void*>(kernel), device, 0);
  const int64_t row_bytes = row_slots * 16;
  const int64_t target_chunk = env_int("TORCH_XENT_CUDA_CHUNK_KB", kTargetChunkBytes / 1024, 4, 1024) * 1024;
  const int64_t max_cluster = env_int("TORCH_XENT_CUDA_MAX_CLUSTER", 1, 1, kMaxCluster);
  int cluster = 1;
  // A row that does not fit one block's share is split over a cluster, so that it is still read
  // from memory once. Without a gradient the row is read once anyway: no cluster needed.
  if (has_grad && info.major >= 9 && binary >= 90 && row_bytes > target_chunk) {
    cluster = static_cast<int>(std::min<int64_t>(max_cluster, ceil_div(row_bytes, target_chunk)));
  }
  const int64_t chunk_slots = ceil_div(row_slots, cluster);
  // Leave room for the block's static shared memory (the reduction scratch).
  const int64_t smem_cap = info.max_smem_optin - 2048;
  const bool cache = has_grad && chunk_slots * 16 <= smem_cap && env_int("TORCH_XENT_CUDA_CACHE", 1, 0, 1) == 1;
  const int smem = cache ? static_cast<int>(chunk_slots * 16) : 0;
  const int threads =
      static_cast<int>(std::max<int64_t>(64, std::min<int64_t>(kMaxRowBlockThreads, pow2_at_most(chunk_slots / 8))));
  p.chunk_slots = static_cast<int>(chunk_slots);
  p.cluster = cluster;
  p.cache = cache;
  prepare_kernel(reinterpret_cast<const void*>(kernel), device, smem);
  TORCH_CHECK(p.M * cluster < std::numeric_limits<int32_t>::max(),
              "torch_xent: too many rows for one launch (", p.M, ")");
  if (cluster == 1) {
    kernel<<<static_cast<unsigned>(p.M), threads, smem, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(static_cast<unsigned>(p.M * cluster), 1, 1);
  config.blockDim = dim3(threads, 1, 1);
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  cudaLaunchAttribute attribute[1];
  attribute[0].id = cudaLaunchAttributeClusterDimension;
  attribute[0].val.clusterDim.x = cluster;
  attribute[0].val.clusterDim.y = 1;
  attribute[0].val.clusterDim.z = 1;
  config.attrs = attribute;
  config.numAttrs = 1;
  C10_CUDA_CHECK(cudaLaunchKernelEx(&config, kernel, p));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, typename acc_t, int MODE>
void launch_positions(const RowParams<T, acc_t>& p, int64_t S, cudaStream_t stream) {
  const int64_t blocks = ceil_div(p.M, kPositionThreads);
  TORCH_CHECK(blocks < std::numeric_limits<int32_t>::max(), "torch_xent: too many positions for one launch (", p.M,
              ")");
  xent_positions_kernel<T, acc_t, MODE><<<static_cast<unsigned>(blocks), kPositionThreads, 0, stream>>>(p, S);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The shared checks (../xent_checks.h), after this backend's own: the logits on a GPU, and rows
// that 32-bit in-row indices can walk (row offsets are 64-bit; a row of 2^31 classes is beyond any use).
void check_inputs(const char* op, const at::Tensor& logits, const at::Tensor& target,
                  const std::optional<at::Tensor>& weight, int64_t reduction, double label_smoothing, double softcap) {
  TORCH_CHECK(logits.is_cuda(), op, ": logits must be a CUDA tensor for this kernel, got ", logits.device());
  check_forward_arguments(op, logits, target, weight, reduction, label_smoothing, softcap);
  // K-dimensional input reaches this kernel as (M, C) rows, or contiguous as (N, C, S) positions.
  TORCH_CHECK(logits.dim() == 2 || logits.dim() == 3, op, ": the CUDA kernel takes 2-D (M, C) or 3-D (N, C, S) "
              "logits, got ", logits.dim(), " dimensions");
  TORCH_CHECK(logits.size(1) < std::numeric_limits<int32_t>::max() - 64, op,
              ": at most 2^31 - 65 classes are supported on CUDA, got ", logits.size(1));
}

// Runs the forward; writes the gradient into `grad` when it is defined (a new buffer, or the
// logits themselves for the in-place op). Returns (loss, lse).
std::tuple<at::Tensor, at::Tensor> forward_impl(const at::Tensor& logits, const at::Tensor& target_in,
                                                const std::optional<at::Tensor>& weight_in, int64_t reduction,
                                                int64_t ignore_index, double label_smoothing, double z_loss,
                                                double softcap, const at::Tensor& grad, bool need_lse) {
  const c10::cuda::CUDAGuard guard(logits.device());
  const at::Tensor target = target_in.contiguous();
  std::optional<at::Tensor> weight;
  if (weight_in.has_value() && weight_in->defined()) weight = weight_in->contiguous();
  // 3-D logits are (N, C, S) positions: the per-row outputs are (N, S), M = N * S.
  const bool nd = logits.dim() == 3;
  const int64_t S = nd ? logits.size(2) : 0;
  const int64_t M = nd ? logits.size(0) * S : logits.size(0), C = logits.size(1);
  const std::vector<int64_t> row_shape = nd ? std::vector<int64_t>{logits.size(0), S} : std::vector<int64_t>{M};
  const auto acc_type = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto acc_opts = logits.options().dtype(acc_type);
  const bool soft = target.is_floating_point();
  // Positions can skip the lse (need_lse=False); a row keeps it in a register and returns it anyway.
  at::Tensor lse = (need_lse || !nd) ? at::empty(row_shape, acc_opts) : at::empty({0}, acc_opts);
  if (M == 0) {
    at::Tensor loss = reduction == kReductionNone ? at::empty(row_shape, acc_opts)
                      : reduction == kReductionSum ? at::zeros({}, acc_opts)
                                                   : at::full({}, std::numeric_limits<double>::quiet_NaN(), acc_opts);
    return {loss, lse};
  }
  at::Tensor row_loss = at::empty(row_shape, acc_opts);
  at::Tensor loss = reduction == kReductionNone ? row_loss : at::empty({}, acc_opts);
  const bool has_weight = weight.has_value() && weight->defined();
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(logits.device().index());
  const int device = logits.device().index();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "torch_xent_forward_cuda", [&] {
    using T = typename CudaType<scalar_t>::type;
    using acc_t = typename AccOf<T>::type;
    RowParams<T, acc_t> p{};
    p.logits = reinterpret_cast<const T*>(logits.const_data_ptr<scalar_t>());
    p.grad = grad.defined() ? reinterpret_cast<T*>(grad.mutable_data_ptr<scalar_t>()) : nullptr;
    p.target = soft ? nullptr : target.const_data_ptr<int64_t>();
    p.soft = soft ? reinterpret_cast<const T*>(target.const_data_ptr<scalar_t>()) : nullptr;
    p.weight = has_weight ? reinterpret_cast<const T*>(weight->const_data_ptr<scalar_t>()) : nullptr;
    p.row_loss = row_loss.mutable_data_ptr<acc_t>();
    p.lse = lse.numel() ? lse.mutable_data_ptr<acc_t>() : nullptr;
    p.M = M;
    p.C = static_cast<int>(C);
    p.ignore_index = ignore_index;
    p.eps = static_cast<acc_t>(label_smoothing);
    p.z_loss = static_cast<acc_t>(z_loss);
    p.cap = static_cast<acc_t>(softcap);
    p.scale = acc_t(1);
    p.scale_ptr = nullptr;
    at::Tensor scale_buffer;
    if (reduction == kReductionMean) {
      if (soft) {
        p.scale = acc_t(1) / static_cast<acc_t>(M);
      } else {
        scale_buffer = at::empty({}, acc_opts);
        xent_mean_scale_kernel<T, acc_t><<<1, kReduceThreads, 0, stream>>>(
            p.target, p.weight, M, C, ignore_index, scale_buffer.mutable_data_ptr<acc_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        p.scale_ptr = scale_buffer.const_data_ptr<acc_t>();
      }
    }
    if (nd) {
      if (soft) {
        launch_positions<T, acc_t, kSoft>(p, S, stream);
      } else if (has_weight && label_smoothing > 0.0) {
        launch_positions<T, acc_t, kHardWeighted>(p, S, stream);
      } else {
        launch_positions<T, acc_t, kHard>(p, S, stream);
      }
    } else if (soft) {
      launch_rows<T, acc_t, kSoft>(p, device, stream);
    } else if (has_weight && label_smoothing > 0.0) {
      launch_rows<T, acc_t, kHardWeighted>(p, device, stream);
    } else {
      launch_rows<T, acc_t, kHard>(p, device, stream);
    }
    if (reduction != kReductionNone) {
      xent_sum_loss_kernel<acc_t><<<1, kReduceThreads, 0, stream>>>(p.row_loss, M, p.scale_ptr, p.scale,
                                                                      loss.mutable_data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {loss, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cross_entropy_forward_cuda(
    const at::Tensor& logits_in, const at::Tensor& target, const std::optional<at::Tensor>& weight, int64_t reduction,
    int64_t ignore_index, double label_smoothing, double z_loss, double softcap, bool compute_grad,
    bool need_lse) {
  check_inputs("torch_xent::cross_entropy_forward", logits_in, target, weight, reduction, label_smoothing, softcap);
  const at::Tensor logits = logits_in.contiguous();
  at::Tensor grad = compute_grad ? at::empty_like(logits, at::MemoryFormat::Contiguous) : logits.new_empty({0});
  auto [loss, lse] = forward_impl(logits, target, weight, reduction, ignore_index, label_smoothing, z_loss, softcap,
                                  compute_grad ? grad : at::Tensor(), need_lse);
  return {loss, lse, grad};
}

std::tuple<at::Tensor, at::Tensor> cross_entropy_forward_inplace_cuda(
    at::Tensor& logits, const at::Tensor& target, const std::optional<at::Tensor>& weight, int64_t reduction,
    int64_t ignore_index, double label_smoothing, double z_loss, double softcap, bool need_lse) {
  check_inputs("torch_xent::cross_entropy_forward_inplace", logits, target, weight, reduction, label_smoothing,
               softcap);
  check_inplace_arguments("torch_xent::cross_entropy_forward_inplace", logits, target);
  return forward_impl(logits, target, weight, reduction, ignore_index, label_smoothing, z_loss, softcap, logits,
                      need_lse);
}

}  // namespace
}  // namespace torch_xent

TORCH_LIBRARY_IMPL(torch_xent, CUDA, m) {
  m.impl("cross_entropy_forward", &torch_xent::cross_entropy_forward_cuda);
  m.impl("cross_entropy_forward_inplace", &torch_xent::cross_entropy_forward_inplace_cuda);
}
