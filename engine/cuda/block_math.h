// Per-block arithmetic of the stored weight types, shared by the CUDA kernels and their CPU tests:
// every function is MOEPOOL_HD (__host__ __device__ under nvcc, plain inline under a host
// compiler), so the code the GPU runs is the code g++ checks against the engine's dequantizers.
//
// Each type is described by a "math" struct M with:
//   Block                 the on-disk block struct (engine/quant/types.h)
//   kBlockElems           elements per block (float types use blocks of 32 elements)
//   kBlockBytes           bytes per block
//   kParts, kPartElems    a block splits into kParts parts of kPartElems elements each; a part is
//                         what one GPU thread unpacks at a time (a few contiguous bytes)
//   Element(part, i)      the element index in the block of value i of `part`
//   DequantPart(b, p, v)  v[i] = value of element Element(p, i) of block b
// Parts are ordered so that, for 256-element blocks, parts [0, kParts / 2) cover elements
// [0, 128) exactly (the matmul kernel works on 128-element chunks of K).
//
// Numerics: DequantPart evaluates, in f32 and in the same order, the expression of the CPU
// dequantizer (engine/quant/dequantize.cc); on the device the multiplies and adds are the _rn
// intrinsics, so nvcc cannot contract them into FMAs and the values are bit-identical to the CPU.
// Dot products take f32 activations (no activation quantization).
#ifndef MOEPOOL_ENGINE_CUDA_BLOCK_MATH_H_
#define MOEPOOL_ENGINE_CUDA_BLOCK_MATH_H_

#include <cstdint>

#include "engine/quant/fp16.h"
#include "engine/quant/types.h"

#ifdef __CUDACC__
#include <cuda_fp16.h>
#define MOEPOOL_HD __host__ __device__ __forceinline__
#define MOEPOOL_PRAGMA(x) _Pragma(#x)
#else
#define MOEPOOL_HD inline
#define MOEPOOL_PRAGMA(x)  // loop pragmas (unroll) are for nvcc only
#endif

namespace moepool::cuda {

MOEPOOL_HD float HalfToFloat(uint16_t h) {
#ifdef __CUDA_ARCH__
  return __half2float(__ushort_as_half(h));  // exact, subnormals included
#else
  return Fp16ToFp32(h);
#endif
}

// Round-to-nearest-even f32 -> IEEE half, the bits KvCache::Store writes.
MOEPOOL_HD uint16_t FloatToHalf(float f) {
#ifdef __CUDA_ARCH__
  return __half_as_ushort(__float2half_rn(f));
#else
  return Fp32ToFp16(f);
#endif
}

MOEPOOL_HD float Bf16ToFloat(uint16_t h) {
#ifdef __CUDA_ARCH__
  return __uint_as_float(static_cast<uint32_t>(h) << 16);
#else
  return Bf16ToFp32(h);
#endif
}

// Correctly rounded f32 multiply / add that the device compiler may not fuse.
MOEPOOL_HD float MulRn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
MOEPOOL_HD float AddRn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}
MOEPOOL_HD float SubRn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}

MOEPOOL_HD float ToF(int v) { return static_cast<float>(v); }

// 6-bit scale (is_min = false) or min of sub-block j (0..7) of Q4_K / Q5_K packed scales.
MOEPOOL_HD int ScaleMinK4(int j, const uint8_t* packed, bool is_min) {
  if (j < 4) return packed[j + (is_min ? 4 : 0)] & 63;
  return is_min ? ((packed[j + 4] >> 4) | ((packed[j] >> 6) << 4))
                : ((packed[j + 4] & 0xF) | ((packed[j - 4] >> 6) << 4));
}

// Signed 6-bit scale of sub-block i (0..15) of a Q3_K block.
MOEPOOL_HD int ScaleQ3K(int i, const uint8_t* packed) {
  const int low = i < 8 ? (packed[i] & 0xF) : (packed[i - 8] >> 4);
  const int high = (packed[8 + i % 4] >> (2 * (i / 4))) & 3;
  return (low | (high << 4)) - 32;
}

// ---- float types: blocks of 32 elements, parts of 4 contiguous elements ----

struct MathF32 {
  using Block = float;
  static constexpr int kBlockElems = 32, kBlockBytes = 128, kParts = 8, kPartElems = 4;
  static MOEPOOL_HD int Element(int part, int i) { return 4 * part + i; }
  static MOEPOOL_HD void DequantPart(const void* block, int part, float* v) {
    const float* f = static_cast<const float*>(block) + 4 * part;
    for (int i = 0; i < 4; ++i) v[i] = f[i];
  }
};

struct MathF16 {
  using Block = uint16_t;
  static constexpr int kBlockElems = 32, kBlockBytes = 64, kParts = 8, kPartElems = 4;
  static MOEPOOL_HD int Element(int part, int i) { return 4 * part + i; }
  static MOEPOOL_HD void DequantPart(const void* block, int part, float* v) {
    const uint16_t* h = static_cast<const uint16_t*>(block) + 4 * part;
    for (int i = 0; i < 4; ++i) v[i] = HalfToFloat(h[i]);
  }
};

struct MathBF16 {
  using Block = uint16_t;
  static constexpr int kBlockElems = 32, kBlockBytes = 64, kParts = 8, kPartElems = 4;
  static MOEPOOL_HD int Element(int part, int i) { return 4 * part + i; }
  static MOEPOOL_HD void DequantPart(const void* block, int part, float* v) {
    const uint16_t* h = static_cast<const uint16_t*>(block) + 4 * part;
    for (int i = 0; i < 4; ++i) v[i] = Bf16ToFloat(h[i]);
  }
};

// ---- 32-element blocks with nibbles (low = element j, high = element j + 16): part p holds
// qs[4p .. 4p + 3], i.e. elements 4p .. 4p + 3 and 16 + 4p .. 16 + 4p + 3 ----

MOEPOOL_HD int NibbleElement(int part, int i) { return i < 4 ? 4 * part + i : 12 + 4 * part + i; }

struct MathQ4_0 {
  using Block = BlockQ4_0;
  static constexpr int kBlockElems = 32, kBlockBytes = sizeof(Block), kParts = 4, kPartElems = 8;
  static MOEPOOL_HD int Element(int part, int i) { return NibbleElement(part, i); }
  static MOEPOOL_HD void DequantPart(const void* block, int part, float* v) {
    const Block& b = *static_cast<const Block*>(block);
    const float d = HalfToFloat(b.d);
    for (int j = 0; j < 4; ++j) {
      const uint8_t q = b.qs[4 * part + j];
      v[j] = MulRn(ToF((q & 0xF) - 8), d);
      v[j + 4] = MulRn(ToF((q >> 4) - 8), d);
    }
  }
};

struct MathQ4_1 {
  using Block = BlockQ4_1;
  static constexpr int kBlockElems = 32, kBlockBytes = sizeof(Block), kParts = 4, kPartElems = 8;
  static MOEPOOL_HD int Element(int part, int i) { return NibbleElement(part, i); }
  static MOEPOOL_HD void DequantPart(const void* block, int part, float* v) {
    const Block& b = *static_cast<const Block*>(block);
    const float d = HalfToFloat(b.d);
    const float m = HalfToFloat(b.m);
    for (int j = 0; j < 4; ++j) {
      const uint8_t q = b.qs[4 * part + j];
      v[j] = AddRn(MulRn(ToF(q & 0xF), d), m);
      v[j + 4] = AddRn(MulRn(ToF(q >> 4), d), m);
    }
  }
};

MOEPOOL_HD uint32_t LoadQh(const uint8_t* qh) {
  return static_cast<uint32_t>(qh[0]) | (static_cast<uint32_t>(qh[1]) << 8) |
         (static_cast<uint32_t>(qh[2]) << 16) | (static_cast<uint32_t>(qh[3]) << 24);
}

struct MathQ5_0 {
  using Block = BlockQ5_0;
  static constexpr int kBlockElems = 32, kBlockBytes = sizeof(Block), kParts = 4, kPartElems = 8;
  static MOEPOOL_HD int Element(int part, int i) { return NibbleElement(part, i); }
  static MOEPOOL_HD void DequantPart(const void* block, int part, float* v) {
    const Block& b = *static_cast<const Block*>(block);
    const float d = HalfToFloat(b.d);
    const uint32_t qh = LoadQh(b.qh);
    for (int j = 0; j < 4; ++j) {
      const int l = 4 * part + j;
      const uint8_t q = b.qs[l];
      const int lo = ((q & 0xF) | (static_cast<int>((qh >> l) & 1u) << 4)) - 16;
      const int hi = ((q >> 4) | (static_cast<int>((qh >> (l + 16)) & 1u) << 4)) - 16;
      v[j] = MulRn(ToF(lo), d);
      v[j + 4] = MulRn(ToF(hi), d);
    }
  }
};

struct MathQ5_1 {
  using Block = BlockQ5_1;
  static constexpr int kBlockElems = 32, kBlockBytes = sizeof(Block), kParts = 4, kPartElems = 8;
  static MOEPOOL_HD int Element(int part, int i) { return NibbleElement(part, i); }
  static MOEPOOL_HD void DequantPart(const void* block, int part, float* v) {
    const Block& b = *static_cast<const Block*>(block);
    const float d = HalfToFloat(b.d);
    const float m = HalfToFloat(b.m);
    const uint32_t qh = LoadQh(b.qh);
    for (int j = 0; j < 4; ++j) {
      const int l = 4 * part + j;
      const uint8_t q = b.qs[l];
      const int lo = (q & 0xF) | (static_cast<int>((qh >> l) & 1u) << 4);
      const int hi = (q >> 4) | (static_cast<int>((qh >> (l + 16)) & 1u) << 4);
      v[j] = AddRn(MulRn(ToF(lo), d), m);
      v[j + 4] = AddRn(MulRn(ToF(hi), d), m);
    }
  }
};

struct MathQ8_0 {
  using Block = BlockQ8_0;
  static constexpr int kBlockElems = 32, kBlockBytes = sizeof(Block), kParts = 4, kPartElems = 8;
  static MOEPOOL_HD int Element(int part, int i) { return 8 * part + i; }
  static MOEPOOL_HD void DequantPart(const void* block, int part, float* v) {
    const Block& b = *static_cast<const Block*>(block);
    const float d = HalfToFloat(b.d);
    for (int i = 0; i < 8; ++i) v[i] = MulRn(ToF(b.qs[8 * part + i]), d);
  }
};

// ---- k-quants with 2-bit planes (Q2_K, Q3_K, Q6_K): byte l of half h (l < 32) holds elements
// 128h + l + 32s for s = 0..3. Part p = (h = p / 8, byte group g = p % 8) covers bytes
// 4g .. 4g + 3 of half h: value i is element 128h + 4g + i % 4 + 32 (i / 4) ----

MOEPOOL_HD int PlaneElement(int part, int i) {
  return 128 * (part >> 3) + 4 * (part & 7) + (i & 3) + 32 * (i >> 2);
}

struct MathQ2_K {
  using Block = BlockQ2_K;
  static constexpr int kBlockElems = 256, kBlockBytes = sizeof(Block), kParts = 16, kPartElems = 16;
  static MOEPOOL_HD int Element(int part, int i) { return PlaneElement(part, i); }
  static MOEPOOL_HD void DequantPart(const void* block, int part, float* v) {
    const Block& b = *static_cast<const Block*>(block);
    const float d = HalfToFloat(b.d);
    const float dmin = HalfToFloat(b.dmin);
    const int h = part >> 3, g = part & 7;
    for (int s = 0; s < 4; ++s) {
      // Sub-block of 16: element 128h + 32s + 4g + j lies in sub-block 8h + 2s + g / 4.
      const uint8_t sc = b.scales[8 * h + 2 * s + (g >> 2)];
      const float dl = MulRn(d, ToF(sc & 0xF));
      const float ml = MulRn(dmin, ToF(sc >> 4));
      for (int j = 0; j < 4; ++j) {
        const int q = (b.qs[32 * h + 4 * g + j] >> (2 * s)) & 3;
        v[4 * s + j] = SubRn(MulRn(dl, ToF(q)), ml);
      }
    }
  }
};

struct MathQ3_K {
  using Block = BlockQ3_K;
  static constexpr int kBlockElems = 256, kBlockBytes = sizeof(Block), kParts = 16, kPartElems = 16;
  static MOEPOOL_HD int Element(int part, int i) { return PlaneElement(part, i); }
  static MOEPOOL_HD void DequantPart(const void* block, int part, float* v) {
    const Block& b = *static_cast<const Block*>(block);
    const float d_all = HalfToFloat(b.d);
    const int h = part >> 3, g = part & 7;
    for (int s = 0; s < 4; ++s) {
      const float dl = MulRn(d_all, ToF(ScaleQ3K(8 * h + 2 * s + (g >> 2), b.scales)));
      for (int j = 0; j < 4; ++j) {
        const int l = 4 * g + j;  // element % 32
        const int low = (b.qs[32 * h + l] >> (2 * s)) & 3;
        const int high_set = (b.hmask[l] >> (4 * h + s)) & 1;
        v[4 * s + j] = MulRn(dl, ToF(low - (high_set ? 0 : 4)));
      }
    }
  }
};

struct MathQ6_K {
  using Block = BlockQ6_K;
  static constexpr int kBlockElems = 256, kBlockBytes = sizeof(Block), kParts = 16, kPartElems = 16;
  static MOEPOOL_HD int Element(int part, int i) { return PlaneElement(part, i); }
  static MOEPOOL_HD void DequantPart(const void* block, int part, float* v) {
    const Block& b = *static_cast<const Block*>(block);
    const float d = HalfToFloat(b.d);
    const int h = part >> 3, g = part & 7;
    const uint8_t* ql = b.ql + 64 * h;
    const uint8_t* qh = b.qh + 32 * h;
    const int8_t* sc = b.scales + 8 * h + (g >> 2);
    // Element l + 32s of the half: low 4 bits from ql[l] (s = 0, 2: low / high nibble) or
    // ql[l + 32] (s = 1, 3), top 2 bits from qh[l] bits 2s, 2s + 1; scale sc[l / 16 + 2s].
    for (int s = 0; s < 4; ++s) {
      const float ds = MulRn(d, ToF(sc[2 * s]));
      for (int j = 0; j < 4; ++j) {
        const int l = 4 * g + j;
        const uint8_t lbyte = ql[l + 32 * (s & 1)];
        const int low = (s < 2) ? (lbyte & 0xF) : (lbyte >> 4);
        const int q = (low | (((qh[l] >> (2 * s)) & 3) << 4)) - 32;
        v[4 * s + j] = MulRn(ds, ToF(q));
      }
    }
  }
};

// ---- Q4_K / Q5_K: chunk c (64 elements) = sub-blocks 2c (low nibbles of qs[32c .. 32c + 31])
// and 2c + 1 (high nibbles). Part p = (c = p / 4, group g = p % 4) covers qs[32c + 8g .. +7]:
// value i is element 64c + 8g + i % 8 + 32 (i / 8) ----

MOEPOOL_HD int ChunkElement(int part, int i) {
  return 64 * (part >> 2) + 8 * (part & 3) + (i & 7) + 32 * (i >> 3);
}

struct MathQ4_K {
  using Block = BlockQ4_K;
  static constexpr int kBlockElems = 256, kBlockBytes = sizeof(Block), kParts = 16, kPartElems = 16;
  static MOEPOOL_HD int Element(int part, int i) { return ChunkElement(part, i); }
  static MOEPOOL_HD void DequantPart(const void* block, int part, float* v) {
    const Block& b = *static_cast<const Block*>(block);
    const float d = HalfToFloat(b.d);
    const float dmin = HalfToFloat(b.dmin);
    const int c = part >> 2, g = part & 3;
    const float d1 = MulRn(d, ToF(ScaleMinK4(2 * c, b.scales, false)));
    const float m1 = MulRn(dmin, ToF(ScaleMinK4(2 * c, b.scales, true)));
    const float d2 = MulRn(d, ToF(ScaleMinK4(2 * c + 1, b.scales, false)));
    const float m2 = MulRn(dmin, ToF(ScaleMinK4(2 * c + 1, b.scales, true)));
    const uint8_t* q = b.qs + 32 * c + 8 * g;
    for (int j = 0; j < 8; ++j) {
      v[j] = SubRn(MulRn(d1, ToF(q[j] & 0xF)), m1);
      v[j + 8] = SubRn(MulRn(d2, ToF(q[j] >> 4)), m2);
    }
  }
};

struct MathQ5_K {
  using Block = BlockQ5_K;
  static constexpr int kBlockElems = 256, kBlockBytes = sizeof(Block), kParts = 16, kPartElems = 16;
  static MOEPOOL_HD int Element(int part, int i) { return ChunkElement(part, i); }
  static MOEPOOL_HD void DequantPart(const void* block, int part, float* v) {
    const Block& b = *static_cast<const Block*>(block);
    const float d = HalfToFloat(b.d);
    const float dmin = HalfToFloat(b.dmin);
    const int c = part >> 2, g = part & 3;
    const float d1 = MulRn(d, ToF(ScaleMinK4(2 * c, b.scales, false)));
    const float m1 = MulRn(dmin, ToF(ScaleMinK4(2 * c, b.scales, true)));
    const float d2 = MulRn(d, ToF(ScaleMinK4(2 * c + 1, b.scales, false)));
    const float m2 = MulRn(dmin, ToF(ScaleMinK4(2 * c + 1, b.scales, true)));
    const uint8_t* q = b.qs + 32 * c + 8 * g;
    const uint8_t* qh = b.qh + 8 * g;
    for (int j = 0; j < 8; ++j) {
      const int lo = (q[j] & 0xF) + (((qh[j] >> (2 * c)) & 1) << 4);
      const int hi = (q[j] >> 4) + (((qh[j] >> (2 * c + 1)) & 1) << 4);
      v[j] = SubRn(MulRn(d1, ToF(lo)), m1);
      v[j + 8] = SubRn(MulRn(d2, ToF(hi)), m2);
    }
  }
};

// Dequantizes a whole block: out[e] for e < M::kBlockElems.
template <class M>
MOEPOOL_HD void DequantBlock(const void* block, float* out) {
  for (int p = 0; p < M::kParts; ++p) {
    float v[M::kPartElems];
    M::DequantPart(block, p, v);
    for (int i = 0; i < M::kPartElems; ++i) out[M::Element(p, i)] = v[i];
  }
}

// Dot product of one weight block with its slice x[0 .. kBlockElems) of an f32 activation row:
// parts in order, values in order, f32 accumulation.
template <class M>
MOEPOOL_HD float DotBlock(const void* block, const float* x) {
  float sum = 0.0f;
  for (int p = 0; p < M::kParts; ++p) {
    float v[M::kPartElems];
    M::DequantPart(block, p, v);
    for (int i = 0; i < M::kPartElems; ++i) sum += v[i] * x[M::Element(p, i)];
  }
  return sum;
}

template <class M>
struct MathTag {
  using type = M;
};

// Calls f(MathTag<M>{}) with the math struct M of `type` (host side; use a generic lambda and
// `typename decltype(tag)::type`). Returns false, calling nothing, for a type without one.
template <class F>
bool DispatchBlockMath(TensorType type, F&& f) {
  switch (type) {
#define MOEPOOL_BLOCK_MATH_CASE(T) \
  case TensorType::k##T:           \
    f(MathTag<Math##T>{});         \
    return true;
    MOEPOOL_BLOCK_MATH_CASE(F32)
    MOEPOOL_BLOCK_MATH_CASE(F16)
    MOEPOOL_BLOCK_MATH_CASE(BF16)
    MOEPOOL_BLOCK_MATH_CASE(Q4_0)
    MOEPOOL_BLOCK_MATH_CASE(Q4_1)
    MOEPOOL_BLOCK_MATH_CASE(Q5_0)
    MOEPOOL_BLOCK_MATH_CASE(Q5_1)
    MOEPOOL_BLOCK_MATH_CASE(Q8_0)
    MOEPOOL_BLOCK_MATH_CASE(Q2_K)
    MOEPOOL_BLOCK_MATH_CASE(Q3_K)
    MOEPOOL_BLOCK_MATH_CASE(Q4_K)
    MOEPOOL_BLOCK_MATH_CASE(Q5_K)
    MOEPOOL_BLOCK_MATH_CASE(Q6_K)
#undef MOEPOOL_BLOCK_MATH_CASE
    default:
      return false;
  }
}

}  // namespace moepool::cuda

#endif  // MOEPOOL_ENGINE_CUDA_BLOCK_MATH_H_
