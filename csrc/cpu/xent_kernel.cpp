// CPU kernels of torch_xent::cross_entropy_forward and torch_xent::cross_entropy_forward_inplace
// (schemas and contract in ../xent.cpp, mathematics in torch_xent/reference.py).
//
// This file checks the arguments, allocates the outputs, runs one pass over the class targets (range
// check and the mean's denominator, so that the gradient written during the forward is already
// final), then runs the row kernel (xent_rows.h, compiled for the best instruction set the CPU has)
// over the rows in parallel, and sums the per-row losses (for reduced K-dimensional input, the
// kernel's per-tile sums) in a fixed order. Nothing here depends on
// the number of threads: the results are the same for a given input whatever it is.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <c10/core/CPUAllocator.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "cpu/xent_cpu.h"
#include "xent_checks.h"
#include "xent_math.h"

// With ATen's OpenMP backend, at::parallel_for is an inline `#pragma omp parallel`: compiled without
// -fopenmp it quietly runs every row on one thread.
#if AT_PARALLEL_OPENMP && !defined(_OPENMP)
#warning "torch_xent: compiled without -fopenmp, so the CPU kernel runs on one thread; build with -fopenmp"
#endif

namespace torch_xent {

int64_t cpu::parallel_threads(int64_t tasks) {
  TORCH_CHECK(tasks >= 0, "cpu_parallel_threads: tasks must be >= 0, got ", tasks);
  std::mutex mutex;
  std::set<std::thread::id> seen;
  at::parallel_for(0, tasks, 1, [&](int64_t, int64_t) {
    std::lock_guard<std::mutex> lock(mutex);
    seen.insert(std::this_thread::get_id());
  });
  return static_cast<int64_t>(seen.size());
}

namespace {

using at::Tensor;

struct RowsVariant {
  cpu::RowsFn fn;
  cpu::TargetsFn targets;
  const char* name;
};

RowsVariant select_rows_kernel() {
#if TORCH_XENT_X86_VARIANTS
  // ATen's own choice (cpuinfo, overridable with ATEN_CPU_CAPABILITY=default|avx2|avx512): the CPU
  // runs ATen's kernels of that capability, so it runs ours.
  const std::string capability = at::get_cpu_capability();
  if (capability == "AVX512") {
    // bfloat16 stores in one instruction where the CPU has AVX512_BF16.
    const char* env = std::getenv("TORCH_XENT_AVX512_BF16");
    const bool allowed = env == nullptr || std::string(env) != "0";
    if (allowed && __builtin_cpu_supports("avx512bf16")) return {&cpu::AVX512_BF16::cross_entropy_rows, &cpu::AVX512_BF16::class_targets, "AVX512_BF16"};
    return {&cpu::AVX512::cross_entropy_rows, &cpu::AVX512::class_targets, "AVX512"};
  }
  if (capability == "AVX2") return {&cpu::AVX2::cross_entropy_rows, &cpu::AVX2::class_targets, "AVX2"};
#endif
  return {&cpu::DEFAULT::cross_entropy_rows, &cpu::DEFAULT::class_targets, "DEFAULT"};
}

const RowsVariant& rows_variant() {
  static const RowsVariant variant = select_rows_kernel();
  return variant;
}

cpu::RowsFn rows_kernel() { return rows_variant().fn; }

// Rows per block of the target pass and of the loss sum: fixed, so that the order of the
// floating-point additions does not depend on the thread count.
constexpr int64_t kSumBlock = 1 << 14;

// at::parallel_for opens a parallel region (waking every thread) for any range of at least one grain;
// a single block runs here directly.
template <typename F>
void for_each_block(int64_t blocks, const F& f) {
  if (blocks <= 1) {
    f(0, blocks);
  } else {
    at::parallel_for(0, blocks, 1, f);
  }
}

template <typename acc_t>
double deterministic_sum(const acc_t* x, int64_t n) {
  const int64_t blocks = (n + kSumBlock - 1) / kSumBlock;
  std::vector<double> partial(static_cast<size_t>(blocks), 0.0);
  for_each_block(blocks, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      double s = 0;
      for (int64_t i = b * kSumBlock, e = std::min(n, (b + 1) * kSumBlock); i < e; ++i) s += x[i];
      partial[static_cast<size_t>(b)] = s;
    }
  });
  double total = 0;
  for (double s : partial) total += s;
  return total;
}

// The one pass over class targets: raises PyTorch's IndexError for the first index outside [0, C)
// that is not ignore_index (before anything is written, which the in-place op relies on), and
// returns the mean's denominator: the summed weights w[y] of the rows that count. The blocks run in
// the kernel's instruction set (xent_targets.h); their sums are added in block order.
double check_class_targets(const int64_t* y, int64_t rows, int64_t classes, int64_t ignore_index, const void* weight,
                           cpu::DType weight_dtype) {
  const cpu::TargetsFn fn = rows_variant().targets;
  const int64_t blocks = (rows + kSumBlock - 1) / kSumBlock;
  std::vector<double> partial(static_cast<size_t>(blocks), 0.0);
  std::vector<int64_t> first_bad(static_cast<size_t>(blocks), -1);
  for_each_block(blocks, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t i0 = b * kSumBlock, n = std::min(rows, (b + 1) * kSumBlock) - i0;
      int64_t bad = -1;
      partial[static_cast<size_t>(b)] = fn(y + i0, n, classes, ignore_index, weight, weight_dtype, &bad);
      first_bad[static_cast<size_t>(b)] = bad < 0 ? -1 : i0 + bad;
    }
  });
  double denom = 0;
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t bad = first_bad[static_cast<size_t>(b)];
    TORCH_CHECK_INDEX(bad < 0, "Target ", (bad < 0 ? 0 : y[bad]), " is out of bounds.");
    denom += partial[static_cast<size_t>(b)];
  }
  return denom;
}

// A fresh gradient buffer is written once, row by row, by every thread: its pages are first touched
// there, in parallel. Asking for transparent huge pages (where the system leaves that to madvise)
// makes those first touches 512 times fewer.
void advise_huge_pages(void* data, size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  if (bytes < 4 * kHuge) return;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(data) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(data) + bytes) & ~(kHuge - 1);
  if (end > begin) (void)madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#else
  (void)data;
  (void)bytes;
#endif
}

// A pool of idle gradient buffers, for the next call of the same size. The gradient a training step
// needs is freed once the backward is through (autograd hands it on, the layer below consumes it),
// and the next step asks for one of the same size again. A fresh buffer costs a page fault per page
// on its first touch (on a VM several times the kernel's own time for a large vocabulary); a pooled
// one is already touched.
//
// The pool holds no reference to a buffer in use: a gradient's storage owns its memory through a
// DataPtr whose deleter gives the memory back to the pool, so a buffer becomes idle exactly when its
// storage is destroyed (the last tensor, view, .grad, Python storage object or saved variable gone),
// as with any allocator. Autograd sees an ordinary storage (it may accumulate into it, steal it into
// .grad, share_memory_() may swap its memory out: the old memory then comes back here, unused). At
// most kPoolSlots idle buffers of at least kPoolMinBytes are kept (malloc keeps the small ones on its
// own free lists); release_gradient_cache() frees them and set_gradient_cache(false) stops the
// pooling. Memory is freed outside the lock.
constexpr size_t kPoolSlots = 2;
constexpr size_t kPoolMinBytes = size_t(4) << 20;

struct PoolBlock {
  c10::DataPtr memory;  // from the CPU allocator; freed when the block is deleted
  size_t bytes;
};

struct GradPool {
  std::mutex mutex;
  bool enabled = true;
  std::vector<PoolBlock*> idle;  // most recently returned last
};

GradPool& grad_pool() {
  static GradPool* pool = new GradPool();  // never destroyed: a gradient may outlive static destructors
  return *pool;
}

// The deleter of a pooled gradient's DataPtr: the storage is gone, its memory goes back to the pool
// (or, the pool being off or full, is freed: the least recently returned block first).
void return_to_pool(void* ctx) {
  PoolBlock* block = static_cast<PoolBlock*>(ctx);
  PoolBlock* evicted = nullptr;
  {
    GradPool& pool = grad_pool();
    std::lock_guard<std::mutex> lock(pool.mutex);
    if (pool.enabled) {
      pool.idle.push_back(block);
      block = nullptr;
      if (pool.idle.size() > kPoolSlots) {
        evicted = pool.idle.front();
        pool.idle.erase(pool.idle.begin());
      }
    }
  }
  delete block;
  delete evicted;
}

Tensor fresh_grad_buffer(const Tensor& logits) {
  Tensor grad = at::empty(logits.sizes(), logits.options());
  advise_huge_pages(grad.data_ptr(), static_cast<size_t>(grad.nbytes()));
  return grad;
}

// A contiguous buffer of the logits' shape and dtype for the gradient: an idle pooled one of the same
// size when there is one, else fresh memory that returns to the pool when its storage is destroyed.
Tensor new_grad_buffer(const Tensor& logits) {
  const size_t bytes = static_cast<size_t>(logits.numel()) * logits.element_size();
  if (bytes < kPoolMinBytes) return fresh_grad_buffer(logits);
  GradPool& pool = grad_pool();
  PoolBlock* block = nullptr;
  {
    std::lock_guard<std::mutex> lock(pool.mutex);
    if (!pool.enabled) return fresh_grad_buffer(logits);
    for (size_t i = pool.idle.size(); i-- > 0;) {
      if (pool.idle[i]->bytes == bytes) {
        block = pool.idle[i];
        pool.idle.erase(pool.idle.begin() + static_cast<std::ptrdiff_t>(i));
        break;
      }
    }
  }
  if (block == nullptr) {
    c10::Allocator* cpu_allocator = c10::GetCPUAllocator();
    block = new PoolBlock{cpu_allocator->allocate(bytes), bytes};
    advise_huge_pages(block->memory.get(), bytes);
  }
  c10::DataPtr data(block->memory.get(), block, &return_to_pool, c10::Device(c10::DeviceType::CPU));
  // Resizable with the CPU allocator: a resize_ past this size moves the tensor to fresh memory and
  // this block back to the pool, like any storage.
  c10::Storage storage(c10::Storage::use_byte_size_t(), bytes, std::move(data), c10::GetCPUAllocator(),
                       /*resizable=*/true);
  Tensor grad = at::empty({0}, logits.options());
  grad.set_(storage, 0, logits.sizes());  // contiguous strides
  return grad;
}

cpu::DType kernel_dtype(at::ScalarType t) {
  switch (t) {
    case at::kDouble:
      return cpu::DType::kDouble;
    case at::kBFloat16:
      return cpu::DType::kBFloat16;
    case at::kHalf:
      return cpu::DType::kHalf;
    default:  // float32: check_forward_arguments lets nothing else through
      return cpu::DType::kFloat;
  }
}

// The shared checks (../xent_checks.h), after this backend's own: every tensor on the CPU (the
// dispatcher picks this kernel when none is on an accelerator, so only the logits' device is left).
void check_arguments(const char* op, const Tensor& logits, const Tensor& target, const c10::optional<Tensor>& weight,
                     int64_t reduction, double label_smoothing, double softcap) {
  TORCH_CHECK(logits.device().is_cpu(), op, ": logits must be on the CPU for this kernel, got ", logits.device());
  check_forward_arguments(op, logits, target, weight, reduction, label_smoothing, softcap);
  // The K-dimensional kernel compares class indices in the accumulation type's lanes: exact below 2^24.
  TORCH_CHECK(logits.dim() == 2 || logits.size(1) < (int64_t(1) << 24), op,
              ": 3-D (N, C, S) logits take at most 2^24 - 1 classes, got ", logits.size(1));
}

// Runs the whole op on contiguous (M, C) or (N, C, S) logits; `grad` is the buffer of their shape to
// write the gradient into (the logits themselves for the in-place op), or undefined for none.
// Returns (loss, lse), the per-row ones of shape (M,) or (N, S).
std::tuple<Tensor, Tensor> run_forward(const Tensor& logits, const Tensor& target_in,
                                       const c10::optional<Tensor>& weight_in, int64_t reduction,
                                       int64_t ignore_index, double label_smoothing, double z_loss, double softcap,
                                       const Tensor& grad, bool need_lse) {
  const bool nd = logits.dim() == 3;
  const int64_t positions = nd ? logits.size(2) : 0;
  const int64_t rows = nd ? logits.size(0) * positions : logits.size(0), classes = logits.size(1);
  const bool prob = at::isFloatingType(target_in.scalar_type());
  const at::ScalarType acc = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto acc_options = logits.options().dtype(acc);
  const Tensor target = target_in.contiguous();
  Tensor weight;  // in the accumulation dtype
  if (weight_in.has_value() && weight_in->defined()) weight = weight_in->to(acc).contiguous();

  cpu::RowsArgs args;
  args.dtype = kernel_dtype(logits.scalar_type());
  args.logits = logits.data_ptr();
  args.grad = grad.defined() ? grad.data_ptr() : nullptr;
  args.rows = rows;
  args.classes = classes;
  args.positions = positions;
  args.ignore_index = ignore_index;
  args.label_smoothing = label_smoothing;
  args.z_loss = z_loss;
  args.softcap = softcap;
  args.weight = weight.defined() ? weight.data_ptr() : nullptr;

  double denom = static_cast<double>(rows);
  if (prob) {
    args.target_prob = target.data_ptr();
  } else {
    args.target = target.data_ptr<int64_t>();
    denom = check_class_targets(args.target, rows, classes, ignore_index, args.weight,
                                acc == at::kDouble ? cpu::DType::kDouble : cpu::DType::kFloat);
  }
  // 0/0 stays NaN, as in PyTorch: an all-ignored (or empty) batch has a NaN mean.
  const double scale = reduction == kReductionMean ? 1.0 / denom : 1.0;
  args.grad_scale = scale;
  if (weight.defined()) {
    args.weight_total = acc == at::kDouble ? deterministic_sum(weight.data_ptr<double>(), classes)
                                           : deterministic_sum(weight.data_ptr<float>(), classes);
  } else {
    args.weight_total = static_cast<double>(classes);
  }

  const std::vector<int64_t> row_shape = nd ? std::vector<int64_t>{logits.size(0), positions}
                                            : std::vector<int64_t>{rows};
  // The tasks are rows, or tiles of positions for 3-D logits.
  const int64_t tasks = nd ? logits.size(0) * ((positions + cpu::kPositionTile - 1) / cpu::kPositionTile) : rows;
  // A reduced K-dimensional loss needs no per-position loss: the kernel sums each tile's (tiles do
  // not depend on the thread count), and the tiles' sums are added here in order.
  const bool tile_sums = nd && reduction != kReductionNone;
  Tensor row_loss;
  std::vector<double> tile_loss;
  if (tile_sums) {
    tile_loss.resize(static_cast<size_t>(tasks));
    args.tile_loss = tile_loss.data();
  } else {
    row_loss = at::empty(row_shape, acc_options);
    args.row_loss = row_loss.data_ptr();
  }
  // The position kernel can skip the lse (4 bytes a position, a tenth of a bfloat16 gradient at C = 19).
  Tensor lse = (need_lse || !nd) ? at::empty(row_shape, acc_options) : at::empty({0}, acc_options);
  args.lse = lse.numel() ? lse.data_ptr() : nullptr;

  if (rows > 0) {
    const cpu::RowsFn kernel = rows_kernel();
    // About 32K elements per task, so that small problems stay on the calling thread.
    const int64_t task_elements = nd ? classes * cpu::kPositionTile : classes;
    const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 15) / task_elements);
    if (tasks <= grain) {
      kernel(args, 0, tasks);
    } else {
      at::parallel_for(0, tasks, grain, [&](int64_t begin, int64_t end) { kernel(args, begin, end); });
    }
  }

  if (reduction == kReductionNone) return {row_loss, lse};
  const double total = tile_sums ? deterministic_sum(tile_loss.data(), tasks)
                       : acc == at::kDouble ? deterministic_sum(row_loss.data_ptr<double>(), rows)
                                            : deterministic_sum(row_loss.data_ptr<float>(), rows);
  Tensor loss = at::empty({}, acc_options);
  if (acc == at::kDouble) {
    *loss.data_ptr<double>() = total * scale;
  } else {
    *loss.data_ptr<float>() = static_cast<float>(total * scale);
  }
  return {loss, lse};
}

}  // namespace

std::string cpu::kernel_variant() { return rows_variant().name; }

void cpu::set_gradient_cache(bool enabled) {
  GradPool& pool = grad_pool();
  std::lock_guard<std::mutex> lock(pool.mutex);
  pool.enabled = enabled;
}

bool cpu::gradient_cache_enabled() {
  GradPool& pool = grad_pool();
  std::lock_guard<std::mutex> lock(pool.mutex);
  return pool.enabled;
}

// Frees the idle buffers; buffers in use are unaffected (they come back when their storage goes).
int64_t cpu::release_gradient_cache() {
  std::vector<PoolBlock*> idle;
  {
    GradPool& pool = grad_pool();
    std::lock_guard<std::mutex> lock(pool.mutex);
    idle.swap(pool.idle);
  }
  int64_t bytes = 0;
  for (PoolBlock* block : idle) {
    bytes += static_cast<int64_t>(block->bytes);
    delete block;
  }
  return bytes;
}

int64_t cpu::gradient_cache_bytes() {
  GradPool& pool = grad_pool();
  std::lock_guard<std::mutex> lock(pool.mutex);
  int64_t bytes = 0;
  for (const PoolBlock* block : pool.idle) bytes += static_cast<int64_t>(block->bytes);
  return bytes;
}

std::tuple<Tensor, Tensor, Tensor> cross_entropy_forward_cpu(const Tensor& logits_in, const Tensor& target,
                                                             const c10::optional<Tensor>& weight, int64_t reduction,
                                                             int64_t ignore_index, double label_smoothing,
                                                             double z_loss, double softcap, bool compute_grad,
                                                             bool need_lse) {
  check_arguments("torch_xent::cross_entropy_forward", logits_in, target, weight, reduction, label_smoothing,
                  softcap);
  const Tensor logits = logits_in.contiguous();
  Tensor grad;
  if (compute_grad) {
    grad = new_grad_buffer(logits);
  }
  auto [loss, lse] = run_forward(logits, target, weight, reduction, ignore_index, label_smoothing, z_loss, softcap,
                                 grad, need_lse);
  if (!compute_grad) grad = at::empty({0}, logits.options());
  return {loss, lse, grad};
}

std::tuple<Tensor, Tensor> cross_entropy_forward_inplace_cpu(Tensor& logits, const Tensor& target,
                                                             const c10::optional<Tensor>& weight, int64_t reduction,
                                                             int64_t ignore_index, double label_smoothing,
                                                             double z_loss, double softcap, bool need_lse) {
  check_arguments("torch_xent::cross_entropy_forward_inplace", logits, target, weight, reduction, label_smoothing,
                  softcap);
  check_inplace_arguments("torch_xent::cross_entropy_forward_inplace", logits, target);
  return run_forward(logits, target, weight, reduction, ignore_index, label_smoothing, z_loss, softcap, logits,
                     need_lse);
}

}  // namespace torch_xent

TORCH_LIBRARY_IMPL(torch_xent, CPU, m) {
  m.impl("cross_entropy_forward", &torch_xent::cross_entropy_forward_cpu);
  m.impl("cross_entropy_forward_inplace", &torch_xent::cross_entropy_forward_inplace_cpu);
}
