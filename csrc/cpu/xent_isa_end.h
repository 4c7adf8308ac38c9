// Closes what cpu/xent_isa.h opened: the instruction set of a variant file ends here.
#pragma GCC pop_options
