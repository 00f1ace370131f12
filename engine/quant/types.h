// Tensor element types of the GGUF format (ggml numbering) and their block layouts.
//
// Every quantized type stores a row of `n` values as n / block_size blocks of block_bytes each.
// The per-type functions (dequantize, quantize, dot products) live in kernels.h; TypeTraits ties
// them together so the rest of the engine never switches on the type itself.
#ifndef MOEPOOL_ENGINE_QUANT_TYPES_H_
#define MOEPOOL_ENGINE_QUANT_TYPES_H_

#include <cstddef>
#include <cstdint>
#include <string_view>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace moepool {

// Values are the on-disk ggml type ids.
enum class TensorType : uint32_t {
  kF32 = 0,
  kF16 = 1,
  kQ4_0 = 2,
  kQ4_1 = 3,
  kQ5_0 = 6,
  kQ5_1 = 7,
  kQ8_0 = 8,
  kQ8_1 = 9,
  kQ2_K = 10,
  kQ3_K = 11,
  kQ4_K = 12,
  kQ5_K = 13,
  kQ6_K = 14,
  kQ8_K = 15,
  kBF16 = 30,
};

inline constexpr int kQK4_0 = 32;
inline constexpr int kQK4_1 = 32;
inline constexpr int kQK5_0 = 32;
inline constexpr int kQK5_1 = 32;
inline constexpr int kQK8_0 = 32;
inline constexpr int kQK8_1 = 32;
inline constexpr int kQK_K = 256;  // super-block size of the k-quants
inline constexpr int kKScaleSize = 12;

// Half floats are stored as raw uint16_t bits (see fp16.h).
struct BlockQ4_0 {
  uint16_t d;              // delta
  uint8_t qs[kQK4_0 / 2];  // nibbles: low = element j, high = element j + 16
};
struct BlockQ4_1 {
  uint16_t d;  // delta
  uint16_t m;  // min
  uint8_t qs[kQK4_1 / 2];
};
struct BlockQ5_0 {
  uint16_t d;
  uint8_t qh[4];  // 5th bit of each element
  uint8_t qs[kQK5_0 / 2];
};
struct BlockQ5_1 {
  uint16_t d;
  uint16_t m;
  uint8_t qh[4];
  uint8_t qs[kQK5_1 / 2];
};
struct BlockQ8_0 {
  uint16_t d;
  int8_t qs[kQK8_0];
};
struct BlockQ8_1 {
  uint16_t d;  // delta
  uint16_t s;  // d * sum(qs)
  int8_t qs[kQK8_1];
};
struct BlockQ2_K {
  uint8_t scales[kQK_K / 16];  // 4-bit scale (low) and 4-bit min (high) per 16 elements
  uint8_t qs[kQK_K / 4];       // 2-bit quants
  uint16_t d;                  // super-block scale for scales
  uint16_t dmin;               // super-block scale for mins
};
struct BlockQ3_K {
  uint8_t hmask[kQK_K / 8];  // high bit of each quant
  uint8_t qs[kQK_K / 4];     // low 2 bits
  uint8_t scales[12];        // 16 6-bit scales
  uint16_t d;
};
struct BlockQ4_K {
  uint16_t d;
  uint16_t dmin;
  uint8_t scales[kKScaleSize];  // 8 6-bit scales and 8 6-bit mins
  uint8_t qs[kQK_K / 2];
};
struct BlockQ5_K {
  uint16_t d;
  uint16_t dmin;
  uint8_t scales[kKScaleSize];
  uint8_t qh[kQK_K / 8];
  uint8_t qs[kQK_K / 2];
};
struct BlockQ6_K {
  uint8_t ql[kQK_K / 2];      // low 4 bits
  uint8_t qh[kQK_K / 4];      // high 2 bits
  int8_t scales[kQK_K / 16];  // 8-bit scales
  uint16_t d;
};
struct BlockQ8_K {
  float d;
  int8_t qs[kQK_K];
  int16_t bsums[kQK_K / 16];  // sum of each group of 16 quants
};

static_assert(sizeof(BlockQ4_0) == 18);
static_assert(sizeof(BlockQ4_1) == 20);
static_assert(sizeof(BlockQ5_0) == 22);
static_assert(sizeof(BlockQ5_1) == 24);
static_assert(sizeof(BlockQ8_0) == 34);
static_assert(sizeof(BlockQ8_1) == 36);
static_assert(sizeof(BlockQ2_K) == 84);
static_assert(sizeof(BlockQ3_K) == 110);
static_assert(sizeof(BlockQ4_K) == 144);
static_assert(sizeof(BlockQ5_K) == 176);
static_assert(sizeof(BlockQ6_K) == 210);
static_assert(sizeof(BlockQ8_K) == 292);

// Converts `n` values (a multiple of the block size) of a row to float.
using DequantizeRowFn = void (*)(const void* src, float* dst, int64_t n);
// Quantizes `n` floats (a multiple of the block size) into blocks of the type.
using QuantizeRowFn = void (*)(const float* src, void* dst, int64_t n);
// Dot product of a weight row `w` (this type) with an activation row `a` already converted to
// this type's vec_dot_type; `n` is the number of elements.
using VecDotFn = float (*)(int64_t n, const void* w, const void* a);
// c dot products of one weight row with activation rows a + i * a_stride (i < c); each out[i] is
// bit-identical to vec_dot of that row (so batching never changes a row's result).
inline constexpr int kMultiDotCols = 8;
// Per Q8_0 activation block, what the Q8_0 matmul tiles read (ConvertRows computes it once per
// matmul, kernels.h): -128 times the sum of its quants, and its scale as a float.
struct Q8_0BlockSum {
  int32_t minus_128_sum;
  float d;
};
using MatTileFn = void (*)(int64_t n, const uint8_t* w, size_t w_stride, int64_t rows,
                           const uint8_t* a, size_t a_stride, int64_t n_act, float* out,
                           int64_t out_stride, void* scratch, const Q8_0BlockSum* a_block_sums);
using VecDotMultiFn = void (*)(int64_t n, const void* w, const void* a, size_t a_stride,
                               float* out);

struct TypeTraits {
  TensorType type;
  const char* name;
  int64_t block_size;       // elements per block
  size_t block_bytes;       // bytes per block
  TensorType vec_dot_type;  // type activations are converted to for vec_dot
  DequantizeRowFn dequantize;
  QuantizeRowFn quantize;   // nullptr if the type cannot be produced
  VecDotFn vec_dot;         // fastest implementation for this CPU (may be == vec_dot_scalar)
  VecDotFn vec_dot_scalar;  // portable reference
  // vec_dot_cols[c] computes c rows at once (c = 2 .. kMultiDotCols); all nullptr where no
  // multi-row kernel exists for this type on this CPU (entries 0 and 1 are always nullptr).
  const VecDotMultiFn* vec_dot_cols;
  // Register-blocked tiles over any number of weight rows x activation rows (kernels.h,
  // kernels::TileKernel), bit-identical to vec_dot; nullptr where none exists on this CPU.
  MatTileFn tile = nullptr;
  // Scratch the tile needs for rows of n elements and n_act activation rows.
  size_t (*tile_scratch_bytes)(int64_t n, int64_t n_act) = nullptr;
};

// Returns the traits of a type id read from a file, or nullptr if moepool does not support it.
const TypeTraits* FindTypeTraits(uint32_t raw_type);
// Traits of a supported type (CHECK-fails on an unsupported one: a programmer error).
const TypeTraits& GetTypeTraits(TensorType type);
// Parses "Q4_K", "f16", ... (case-insensitive); nullptr if unknown.
const TypeTraits* FindTypeTraitsByName(std::string_view name);

// Bytes of a row of `n` elements; `n` must be a multiple of the block size.
size_t RowBytes(TensorType type, int64_t n);

// True when the AVX2 + FMA + F16C kernels were compiled in and this CPU supports them.
bool CpuHasAvx2();
// True when the AVX512-VNNI builds of the AVX2 kernels were compiled in and this CPU supports
// them; they then replace the AVX2 ones and return the same bits.
bool CpuHasAvx512Vnni();
// The kernels GetTypeTraits hands out now: "avx512-vnni", "avx2" or "scalar". By default the
// fastest this CPU runs; $MOEPOOL_CPU_KERNELS (auto|avx512|avx2|scalar) or SetCpuKernels picks
// another, so that one machine can compare the paths (every build returns the same bits for
// the k-quants, see block_numerics.h).
const char* KernelIsaName();
// True while the selected kernels include the AVX2 ones (avx2 or avx512-vnni).
bool UseAvx2Kernels();
// True while the avx512-vnni kernels are selected.
bool UseAvx512Kernels();
// How far ahead (bytes) the dot-product kernels and the tiles' packing ask for the weight rows
// they stream: without it the hardware prefetcher leaves decode at 60-70% of the memory
// bandwidth bound (docs/engine.md). $MOEPOOL_PREFETCH_BYTES (0 = none, at most 65536) overrides
// the default of kDefaultPrefetchBytes, read once; a bad value is reported on stderr and ignored.
inline constexpr size_t kDefaultPrefetchBytes = 3072;
size_t WeightPrefetchBytes();
// $MOEPOOL_PREFETCH_BYTES's value: a decimal count of bytes in 0..65536 (else InvalidArgument).
absl::StatusOr<size_t> ParsePrefetchBytes(std::string_view text);
// Selects the kernels by name (as $MOEPOOL_CPU_KERNELS); InvalidArgument for an unknown name or
// one this CPU cannot run. Thread-safe, but traits handed out before keep their kernels: call it
// before loading a model.
absl::Status SetCpuKernels(std::string_view name);

}  // namespace moepool

#endif  // MOEPOOL_ENGINE_QUANT_TYPES_H_
