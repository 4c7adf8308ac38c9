// The bfloat16 row kernels for AVX-512 CPUs that also convert float32 to bfloat16 in one instruction
// (AVX512_BF16: VCVTNE2PS2BF16, on Intel Xeon from Cooper Lake and AMD from Zen 4). The rest is the
// AVX512 variant (xent_rows_x86_avx512.cpp); other dtypes go there. xent_kernel.cpp calls this only
// when ATen's capability is AVX512 and the CPU has AVX512_BF16 (TORCH_XENT_AVX512_BF16=0 turns it off).
// The one difference in results: the instruction flushes denormal results (below 1.2e-38 in
// magnitude) to zero, where the AVX512 variant's rounding keeps them.
#include "cpu/xent_cpu.h"

#if TORCH_XENT_X86_VARIANTS
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <tuple>

#define CPU_CAPABILITY AVX512_BF16
#define CPU_CAPABILITY_AVX512
#define TORCH_XENT_AVX512_BF16 1
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,avx512bf16")
// g++ preprocesses the whole file before it parses the pragma, so the ISA macros that headers test
// (sleef.h declares its vector functions only under them) must be set by hand.
#ifndef __SSE3__
#define __SSE3__ 1
#endif
#ifndef __SSSE3__
#define __SSSE3__ 1
#endif
#ifndef __SSE4_1__
#define __SSE4_1__ 1
#endif
#ifndef __SSE4_2__
#define __SSE4_2__ 1
#endif
#ifndef __AVX__
#define __AVX__ 1
#endif
#ifndef __AVX2__
#define __AVX2__ 1
#endif
#ifndef __FMA__
#define __FMA__ 1
#endif
#ifndef __F16C__
#define __F16C__ 1
#endif
#ifndef __AVX512F__
#define __AVX512F__ 1
#endif
#ifndef __AVX512BW__
#define __AVX512BW__ 1
#endif
#ifndef __AVX512VL__
#define __AVX512VL__ 1
#endif
#ifndef __AVX512DQ__
#define __AVX512DQ__ 1
#endif
#ifndef __AVX512BF16__
#define __AVX512BF16__ 1
#endif
#include "cpu/xent_rows.h"
#pragma GCC pop_options
#endif
