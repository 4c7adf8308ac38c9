// The row kernels for AVX2 CPUs (what ATen calls its AVX2 capability: AVX2 and FMA, with F16C).
// setup.py compiles every file with the same baseline flags, so the instruction set is switched on
// here, and only after the standard headers: their inline functions stay baseline code, which the
// linker may share with the other translation units. The CPU_CAPABILITY macros put ATen's
// Vectorized (and everything in xent_rows.h) in namespaces of their own, so the AVX2 copies never
// stand in for the portable ones. xent_kernel.cpp calls this only when the CPU has AVX2.
#include "cpu/xent_cpu.h"

#if TORCH_XENT_X86_VARIANTS
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <tuple>

#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
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
#include "cpu/xent_rows.h"
#pragma GCC pop_options
#endif
