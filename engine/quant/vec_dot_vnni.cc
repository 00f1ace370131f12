// vec_dot_avx2.cc built again for CPUs with AVX512-VNNI (compiled with -mavx512f -mavx512vl
// -mavx512bw -mavx512vnni, see engine/CMakeLists.txt): the same kernels with 32 vector registers
// and fused multiply-accumulates, exported as VecDot*Vnni. See vec_dot_avx2_internal.h.
#include "engine/quant/vec_dot_avx2.cc"  // NOLINT(build/include): one source, two instruction sets
