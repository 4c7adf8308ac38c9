// The bfloat16 row kernels for AVX-512 CPUs that also convert float32 to bfloat16 in one instruction
// (AVX512_BF16: VCVTNE2PS2BF16, on Intel Xeon from Cooper Lake and AMD from Zen 4). The rest is the
// AVX512 variant (xent_rows_x86_avx512.cpp); other dtypes go there. xent_kernel.cpp calls this only
// when ATen's capability is AVX512 and the CPU has AVX512_BF16 (TORCH_XENT_AVX512_BF16=0 turns it off).
// The one difference in results: the instruction flushes denormal results (below 1.2e-38 in
// magnitude) to zero, where the AVX512 variant's rounding keeps them.
#include "cpu/xent_cpu.h"

#if TORCH_XENT_X86_VARIANTS
#define TORCH_XENT_ISA_LEVEL 3
#include "cpu/xent_isa.h"
#include "cpu/xent_rows.h"
#include "cpu/xent_isa_end.h"
#endif
