// The row kernels for AVX-512 CPUs (what ATen calls its AVX512 capability: AVX-512 F, BW, VL and DQ,
// with FMA). cpu/xent_isa.h says how the instruction set is switched on. xent_kernel.cpp calls this
// only when the CPU has AVX-512.
#include "cpu/xent_cpu.h"

#if TORCH_XENT_X86_VARIANTS
#define TORCH_XENT_ISA_LEVEL 2
#include "cpu/xent_isa.h"
#include "cpu/xent_rows.h"
#include "cpu/xent_isa_end.h"
#endif
