// The instruction-set set-up that every x86 variant file shares; a variant defines
// TORCH_XENT_ISA_LEVEL (1: AVX2, 2: AVX512, 3: AVX512 with AVX512_BF16) and then includes, in order,
// this header, "cpu/xent_rows.h" and "cpu/xent_isa_end.h".
//
// setup.py compiles every file with the same baseline flags, so the instruction set is switched on
// here, and only after the standard headers: their inline functions stay baseline code, which the
// linker may share with the other translation units. The CPU_CAPABILITY macros put ATen's
// Vectorized (and everything in xent_rows.h) in namespaces of their own, so a variant's copies never
// stand in for the portable ones. g++ preprocesses the whole file before it parses the pragma, so the
// ISA macros that headers test (sleef.h declares its vector functions only under them) are set by hand.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <tuple>

#if TORCH_XENT_ISA_LEVEL == 1
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#elif TORCH_XENT_ISA_LEVEL == 2
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")
#elif TORCH_XENT_ISA_LEVEL == 3
#define CPU_CAPABILITY AVX512_BF16
#define CPU_CAPABILITY_AVX512
#define TORCH_XENT_AVX512_BF16 1
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,avx512bf16")
#else
#error "define TORCH_XENT_ISA_LEVEL to 1, 2 or 3 before including cpu/xent_isa.h"
#endif

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
#if TORCH_XENT_ISA_LEVEL >= 2
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
#endif
#if TORCH_XENT_ISA_LEVEL >= 3
#ifndef __AVX512BF16__
#define __AVX512BF16__ 1
#endif
#endif
