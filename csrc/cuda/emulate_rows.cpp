// Runs the CUDA kernels' per-row code (xent_rows.cuh) and per-position code (xent_positions.cuh) on
// the CPU, one thread of the GPU after another, for tests on machines without a GPU (tests/test_cuda.py builds this file with a host
// C++ compiler and the CUDA headers, and calls it through ctypes). It is not part of the extension.
//
// What it checks: the span / slot partition of a row over the threads of a group, a block or a
// cluster (misaligned rows and tensors, partial slots, empty shares), both passes, the target
// terms of every mode, the in-place write order, and that the butterfly reduction leaves every
// lane of a warp with the same bits. What it cannot check: the CUDA-only parts (shuffle masks,
// barriers, distributed shared memory, launch configuration), which only run on a GPU.
//
// The reductions are emulated in the kernels' order: an xor butterfly within each warp (or group
// of at most 32 threads), then the warps of a block in order, then the blocks of a cluster in order.
#include <cstdint>
#include <cstring>
#include <vector>

#include "xent_positions.cuh"
#include "xent_rows.cuh"

namespace {

using namespace torch_xent::rows;

struct Abort {};

template <typename acc_t>
bool same_bits(const Stats<acc_t>& a, const Stats<acc_t>& b) {
  return std::memcmp(&a, &b, sizeof(a)) == 0;
}

// The combination of one block's (or group's) per-thread partial results, as the kernel computes it.
// Returns false if the lanes of a warp disagree (the butterfly would not be deterministic).
template <typename acc_t>
bool block_reduce(std::vector<Stats<acc_t>> v, int nthreads, Stats<acc_t>& out) {
  const int width = nthreads < 32 ? nthreads : 32;
  for (int w0 = 0; w0 < nthreads; w0 += width) {
    for (int offset = width / 2; offset > 0; offset /= 2) {
      std::vector<Stats<acc_t>> next(v);
      for (int l = 0; l < width; ++l) next[w0 + l] = combine(v[w0 + l], v[w0 + (l ^ offset)]);
      v.swap(next);
    }
    for (int l = 1; l < width; ++l) {
      if (!same_bits(v[w0 + l], v[w0])) return false;
    }
  }
  out = v[0];
  for (int w0 = width; w0 < nthreads; w0 += width) out = combine(out, v[w0]);
  return true;
}

template <typename T, typename acc_t, int MODE>
int emulate(const RowParams<T, acc_t>& p, int nthreads) {
  const int nranks = p.cluster;
  std::vector<uint4> cache(p.cache ? static_cast<size_t>(p.chunk_slots) * nranks : 0);
  auto cache_of = [&](int rank) { return p.cache ? cache.data() + static_cast<size_t>(rank) * p.chunk_slots : nullptr; };
  std::vector<Stats<acc_t>> partial(static_cast<size_t>(nranks) * nthreads);
  for (int64_t row = 0; row < p.M; ++row) {
    // Pass A: every thread's share of pass 1, stopped where the kernel would reduce.
    bool reduced = false;
    for (int rank = 0; rank < nranks; ++rank) {
      for (int lane = 0; lane < nthreads; ++lane) {
        try {
          process_row<T, acc_t, MODE>(p, row, rank, lane, nthreads, cache_of(rank),
                                      [&](const Stats<acc_t>& s) -> Stats<acc_t> {
                                        partial[static_cast<size_t>(rank) * nthreads + lane] = s;
                                        throw Abort{};
                                      });
        } catch (const Abort&) {
          reduced = true;
        }
      }
    }
    if (!reduced) continue;  // an ignored or out-of-range row: already written in full
    Stats<acc_t> total;
    for (int rank = 0; rank < nranks; ++rank) {
      std::vector<Stats<acc_t>> mine(partial.begin() + static_cast<size_t>(rank) * nthreads,
                                     partial.begin() + static_cast<size_t>(rank + 1) * nthreads);
      Stats<acc_t> b;
      if (!block_reduce(mine, nthreads, b)) return 1;
      total = rank == 0 ? b : combine(total, b);
    }
    // Pass B: the same threads again, now given the row's combination (pass 1 is recomputed from
    // the same data: each thread reads only its own slots, so the in-place writes of the threads
    // before it do not disturb it).
    for (int rank = 0; rank < nranks; ++rank) {
      for (int lane = 0; lane < nthreads; ++lane) {
        process_row<T, acc_t, MODE>(p, row, rank, lane, nthreads, cache_of(rank),
                                    [&](const Stats<acc_t>&) { return total; });
      }
    }
  }
  return 0;
}

template <typename T, typename acc_t>
int dispatch_mode(int mode, const RowParams<T, acc_t>& p, int nthreads) {
  switch (mode) {
    case kHard: return emulate<T, acc_t, kHard>(p, nthreads);
    case kHardWeighted: return emulate<T, acc_t, kHardWeighted>(p, nthreads);
    case kSoft: return emulate<T, acc_t, kSoft>(p, nthreads);
    default: return 2;
  }
}

template <typename T, typename acc_t>
int emulate_positions(int mode, const RowParams<T, acc_t>& p, int64_t S) {
  // The kernel's threads, one after another (each touches only its own position's elements).
  for (int64_t row = 0; row < p.M; ++row) {
    switch (mode) {
      case kHard: process_position<T, acc_t, kHard>(p, S, row); break;
      case kHardWeighted: process_position<T, acc_t, kHardWeighted>(p, S, row); break;
      case kSoft: process_position<T, acc_t, kSoft>(p, S, row); break;
      default: return 2;
    }
  }
  return 0;
}

template <typename T>
int run(int mode, const void* logits, void* grad, const int64_t* target, const void* soft, const void* weight,
        void* row_loss, void* lse, double scale, int64_t M, int C, int64_t ignore_index, double eps, double z_loss,
        double cap, int nthreads, int cluster, int chunk_slots, int cache, int64_t positions) {
  using acc_t = typename AccOf<T>::type;
  RowParams<T, acc_t> p{};
  p.logits = static_cast<const T*>(logits);
  p.grad = static_cast<T*>(grad);
  p.target = target;
  p.soft = static_cast<const T*>(soft);
  p.weight = static_cast<const T*>(weight);
  p.row_loss = static_cast<acc_t*>(row_loss);
  p.lse = static_cast<acc_t*>(lse);
  p.scale_ptr = nullptr;
  p.scale = static_cast<acc_t>(scale);
  p.M = M;
  p.C = C;
  p.ignore_index = ignore_index;
  p.eps = static_cast<acc_t>(eps);
  p.z_loss = static_cast<acc_t>(z_loss);
  p.cap = static_cast<acc_t>(cap);
  p.chunk_slots = chunk_slots;
  p.cluster = cluster;
  p.cache = cache != 0;
  if (positions > 0) return emulate_positions<T, acc_t>(mode, p, positions);
  return dispatch_mode<T, acc_t>(mode, p, nthreads);
}

}  // namespace

// dtype: 0 float32, 1 float64, 2 float16, 3 bfloat16. Returns 0 on success, 1 if a warp's lanes
// disagreed after the butterfly, 2 for a bad argument. With positions = S > 0 the problem is
// (N, C, S) K-dimensional input (M = N * S positions; lse may be null) and the thread
// configuration arguments are unused.
extern "C" int xent_emulate_rows(int dtype, int mode, const void* logits, void* grad, const int64_t* target,
                                 const void* soft, const void* weight, void* row_loss, void* lse, double scale,
                                 int64_t M, int C, int64_t ignore_index, double eps, double z_loss, double cap,
                                 int nthreads, int cluster, int chunk_slots, int cache, int64_t positions) {
  switch (dtype) {
    case 0: return run<float>(mode, logits, grad, target, soft, weight, row_loss, lse, scale, M, C, ignore_index, eps,
                              z_loss, cap, nthreads, cluster, chunk_slots, cache, positions);
    case 1: return run<double>(mode, logits, grad, target, soft, weight, row_loss, lse, scale, M, C, ignore_index,
                               eps, z_loss, cap, nthreads, cluster, chunk_slots, cache, positions);
    case 2: return run<__half>(mode, logits, grad, target, soft, weight, row_loss, lse, scale, M, C, ignore_index,
                               eps, z_loss, cap, nthreads, cluster, chunk_slots, cache, positions);
    case 3: return run<__nv_bfloat16>(mode, logits, grad, target, soft, weight, row_loss, lse, scale, M, C,
                                      ignore_index, eps, z_loss, cap, nthreads, cluster, chunk_slots, cache, positions);
    default: return 2;
  }
}
