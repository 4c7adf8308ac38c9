// The row kernels for AVX-512 CPUs (what ATen calls its AVX512 capability: AVX-512 F, BW, VL and DQ,
// with FMA). See xent_rows_x86_avx2.cpp for why the instruction set is switched on here, after the
// standard headers. xent_kernel.cpp calls this only when the CPU has AVX-512.
#include "cpu/xent_cpu.h"

#if TORCH_XENT_X86_VARIANTS
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <tuple>

#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")
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
#include "cpu/xent_rows.h"
#pragma GCC pop_options
#endif
