// The row kernels for any CPU: ATen's DEFAULT Vectorized (plain arrays that the compiler may
// vectorise with the baseline instruction set). Used when the CPU (or ATEN_CPU_CAPABILITY) offers
// neither AVX2 nor AVX-512, and on non-x86 machines.
#define CPU_CAPABILITY DEFAULT
#define CPU_CAPABILITY_DEFAULT
#include "cpu/xent_rows.h"
