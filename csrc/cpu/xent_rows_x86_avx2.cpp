// The row kernels for AVX2 CPUs (what ATen calls its AVX2 capability: AVX2 and FMA, with F16C).
// cpu/xent_isa.h says how the instruction set is switched on. xent_kernel.cpp calls this only when
// the CPU has AVX2.
#include "cpu/xent_cpu.h"

#if TORCH_XENT_X86_VARIANTS
#define TORCH_XENT_ISA_LEVEL 1
#include "cpu/xent_isa.h"
#include "cpu/xent_rows.h"
#include "cpu/xent_isa_end.h"
#endif
