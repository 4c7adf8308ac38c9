// The interface between the CPU op (xent_kernel.cpp: checks, allocation, threads, reductions) and
// the row kernels (xent_rows.h), which are compiled once per instruction set:
//   xent_rows_default.cpp     portable (ATen's DEFAULT Vectorized: plain C++ the compiler may vectorise)
//   xent_rows_x86_avx2.cpp    AVX2 + FMA + F16C
//   xent_rows_x86_avx512.cpp  AVX-512 F/BW/VL/DQ
//   xent_rows_x86_avx512_bf16.cpp  the same with AVX512_BF16, for bfloat16 (its float -> bfloat16 stores)
// xent_kernel.cpp picks one at run time from at::native::get_cpu_capability(), so the extension runs
// on any x86-64 CPU (and honours ATEN_CPU_CAPABILITY=default|avx2|avx512, which the tests use to check
// every variant). This header only holds plain C++ types: it is included before the instruction-set
// pragmas of those files, and nothing in it may be compiled for a wider instruction set.
#pragma once

#include <cstdint>
#include <string>

// The x86 variants rely on `#pragma GCC target`, which GCC honours (and clang does not): other
// compilers and architectures build the portable variant only.
#if defined(__GNUC__) && !defined(__clang__) && (defined(__x86_64__) || defined(_M_X64))
#define TORCH_XENT_X86_VARIANTS 1
#else
#define TORCH_XENT_X86_VARIANTS 0
#endif

namespace torch_xent {
namespace cpu {

enum class DType : int { kFloat = 0, kDouble = 1, kBFloat16 = 2, kHalf = 3 };

// Positions per tile of the K-dimensional layout (RowsArgs::positions > 0), for every instruction set.
constexpr int64_t kPositionTile = 64;

// One problem of M rows of C classes; every pointer is contiguous. acc_t below is float, or
// double for double logits. With positions = S > 0 the problem is K-dimensional input in its own
// layout: logits (N, C, S) (and probability targets and gradient alike), class targets and the
// per-row outputs (N, S), M = N * S rows.
struct RowsArgs {
  DType dtype = DType::kFloat;
  const void* logits = nullptr;       // (M, C) logits dtype
  void* grad = nullptr;               // (M, C) logits dtype, may equal logits (inplace); null: no gradient
  const int64_t* target = nullptr;    // (M,) class indices, already checked to be in range or ignored
  const void* target_prob = nullptr;  // (M, C) class probabilities in the logits dtype (instead of target)
  const void* weight = nullptr;       // (C,) class weights in acc_t, or null
  void* row_loss = nullptr;           // (M,) acc_t out: per-row loss (0 for ignored rows)
  void* lse = nullptr;                // (M,) acc_t out: per-row log-sum-exp (0 for ignored rows)
  // K-dimensional problems only (positions > 0): row_loss and lse may be null (not wanted); without
  // row_loss, tile_loss[t] receives the sum of tile t's losses (in double, in position order).
  double* tile_loss = nullptr;
  int64_t rows = 0;
  int64_t classes = 0;
  int64_t positions = 0;              // 0: (M, C) rows; else S of an (N, C, S) problem
  int64_t ignore_index = -100;
  double label_smoothing = 0.0;
  double z_loss = 0.0;
  double softcap = 0.0;               // 0: off
  double grad_scale = 1.0;            // the reduction's factor, folded into the gradient (1/denom for mean)
  double weight_total = 0.0;          // sum of the class weights (C without weights)
};

// The number of distinct threads that one at::parallel_for over `tasks` tasks of grain 1 runs on,
// as compiled into this extension (1 when built without the OpenMP that torch's backend needs).
int64_t parallel_threads(int64_t tasks);

// The instruction-set variant of the row kernel, chosen once per process: DEFAULT, AVX2, AVX512 or
// AVX512_BF16 (AVX512, with bfloat16 run by xent_rows_x86_avx512_bf16.cpp).
std::string kernel_variant();

// The CPU op's pool of idle gradient buffers (xent_kernel.cpp): turn the reuse on or off, free the
// idle buffers (returns their bytes), and how many bytes of idle buffers it holds now.
void set_gradient_cache(bool enabled);
bool gradient_cache_enabled();
int64_t release_gradient_cache();
int64_t gradient_cache_bytes();

// Processes rows [begin, end) of the problem (with positions > 0: tiles [begin, end), tile t being
// positions [s0, s0 + kPositionTile) of batch item t / ceil(S / kPositionTile)): writes row_loss, lse
// and (when grad) the gradient.
using RowsFn = void (*)(const RowsArgs& args, int64_t begin, int64_t end);

// One block of the pass over class targets (xent_targets.h): returns the mean's denominator over
// y[0, n) (the count of the targets that are not ignore_index, or the sum of their weights, weight
// being (C,) float or double, or null) and sets first_bad to the first index of y outside [0, C)
// that is not ignore_index, or -1.
using TargetsFn = double (*)(const int64_t* y, int64_t n, int64_t classes, int64_t ignore_index, const void* weight,
                             DType weight_dtype, int64_t* first_bad);

namespace DEFAULT {
void cross_entropy_rows(const RowsArgs& args, int64_t begin, int64_t end);
double class_targets(const int64_t* y, int64_t n, int64_t classes, int64_t ignore_index, const void* weight,
                     DType weight_dtype, int64_t* first_bad);
}
#if TORCH_XENT_X86_VARIANTS
namespace AVX2 {
void cross_entropy_rows(const RowsArgs& args, int64_t begin, int64_t end);
double class_targets(const int64_t* y, int64_t n, int64_t classes, int64_t ignore_index, const void* weight,
                     DType weight_dtype, int64_t* first_bad);
}
namespace AVX512 {
void cross_entropy_rows(const RowsArgs& args, int64_t begin, int64_t end);
double class_targets(const int64_t* y, int64_t n, int64_t classes, int64_t ignore_index, const void* weight,
                     DType weight_dtype, int64_t* first_bad);
}
namespace AVX512_BF16 {
void cross_entropy_rows(const RowsArgs& args, int64_t begin, int64_t end);
double class_targets(const int64_t* y, int64_t n, int64_t classes, int64_t ignore_index, const void* weight,
                     DType weight_dtype, int64_t* first_bad);
}
#endif

}  // namespace cpu
}  // namespace torch_xent
