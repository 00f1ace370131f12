#include "engine/quant/types.h"

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#endif

#include <array>
#include <atomic>
#include <cctype>
#include <cstdio>
#include <cstdlib>
#include <string>

#include "engine/quant/kernels.h"

static_assert(moepool::kernels::kMultiCols == moepool::kMultiDotCols);

namespace moepool {
namespace {

std::atomic<bool> g_force_scalar{false};

// The fastest build of a kernel this CPU runs (kernels.h).
enum class Isa { kScalar, kAvx2, kVnni };

#ifdef MOEPOOL_HAVE_VNNI_KERNELS
#define MOEPOOL_VNNI_OR_AVX2(name) (isa == Isa::kVnni ? kernels::name##Vnni : kernels::name##Avx2)
#else
#define MOEPOOL_VNNI_OR_AVX2(name) (kernels::name##Avx2)
#endif

#define MOEPOOL_TRAITS(T, BLOCK, STRUCT_BYTES, DOT)                                            \
  TypeTraits {                                                                                 \
    TensorType::k##T, #T, BLOCK, STRUCT_BYTES, TensorType::k##DOT, &kernels::DequantizeRow##T, \
        &kernels::QuantizeRow##T,                                                              \
        isa == Isa::kScalar ? &kernels::VecDot##T##Scalar : MOEPOOL_VNNI_OR_AVX2(VecDot##T),   \
        &kernels::VecDot##T##Scalar                                                            \
  }

std::array<TypeTraits, 13> MakeTable(Isa isa) {
  return {
      MOEPOOL_TRAITS(F32, 1, 4, F32),
      MOEPOOL_TRAITS(F16, 1, 2, F32),
      MOEPOOL_TRAITS(BF16, 1, 2, F32),
      MOEPOOL_TRAITS(Q4_0, kQK4_0, sizeof(BlockQ4_0), Q8_0),
      MOEPOOL_TRAITS(Q4_1, kQK4_1, sizeof(BlockQ4_1), Q8_1),
      MOEPOOL_TRAITS(Q5_0, kQK5_0, sizeof(BlockQ5_0), Q8_0),
      MOEPOOL_TRAITS(Q5_1, kQK5_1, sizeof(BlockQ5_1), Q8_1),
      MOEPOOL_TRAITS(Q8_0, kQK8_0, sizeof(BlockQ8_0), Q8_0),
      MOEPOOL_TRAITS(Q2_K, kQK_K, sizeof(BlockQ2_K), Q8_K),
      MOEPOOL_TRAITS(Q3_K, kQK_K, sizeof(BlockQ3_K), Q8_K),
      MOEPOOL_TRAITS(Q4_K, kQK_K, sizeof(BlockQ4_K), Q8_K),
      MOEPOOL_TRAITS(Q5_K, kQK_K, sizeof(BlockQ5_K), Q8_K),
      MOEPOOL_TRAITS(Q6_K, kQK_K, sizeof(BlockQ6_K), Q8_K),
  };
}
#undef MOEPOOL_TRAITS

// Activation-only types: no dot product of their own.
std::array<TypeTraits, 2> MakeActivationTable(Isa isa) {
  const bool avx2 = isa != Isa::kScalar;
  return {
      TypeTraits{TensorType::kQ8_1, "Q8_1", kQK8_1, sizeof(BlockQ8_1), TensorType::kQ8_1,
                 &kernels::DequantizeRowQ8_1,
                 avx2 ? &kernels::QuantizeRowQ8_1Avx2 : &kernels::QuantizeRowQ8_1, nullptr, nullptr,
                 nullptr},
      TypeTraits{TensorType::kQ8_K, "Q8_K", kQK_K, sizeof(BlockQ8_K), TensorType::kQ8_K,
                 &kernels::DequantizeRowQ8_K,
                 avx2 ? &kernels::QuantizeRowQ8_KAvx2 : &kernels::QuantizeRowQ8_K, nullptr, nullptr,
                 nullptr},
  };
}

struct Tables {
  std::array<TypeTraits, 13> stored[2];
  std::array<TypeTraits, 2> activation[2];
};

Isa FastestIsa() {
  if (CpuHasAvx512Vnni()) return Isa::kVnni;
  return CpuHasAvx2() ? Isa::kAvx2 : Isa::kScalar;
}

const Tables& GetTables() {
  static const Tables* tables = [] {
    auto* t = new Tables;
    const Isa isa = FastestIsa();
    t->stored[0] = MakeTable(Isa::kScalar);
    t->stored[1] = MakeTable(isa);
    t->activation[0] = MakeActivationTable(Isa::kScalar);
    t->activation[1] = MakeActivationTable(isa);
    // Q8_0 is both stored and an activation type: use the fast quantizer on the fast table.
    if (isa != Isa::kScalar) {
      for (auto& tr : t->stored[1]) {
        switch (tr.type) {
          case TensorType::kF16:
            tr.quantize = &kernels::QuantizeRowF16Avx2;
            tr.dequantize = &kernels::DequantizeRowF16Avx2;
            break;
          case TensorType::kQ8_0:
            tr.quantize = &kernels::QuantizeRowQ8_0Avx2;
            tr.vec_dot_cols = MOEPOOL_VNNI_OR_AVX2(kVecDotQ8_0Cols);
            break;
          case TensorType::kQ4_K:
            tr.vec_dot_cols = MOEPOOL_VNNI_OR_AVX2(kVecDotQ4_KCols);
            break;
          case TensorType::kQ5_K:
            tr.vec_dot_cols = MOEPOOL_VNNI_OR_AVX2(kVecDotQ5_KCols);
            break;
          case TensorType::kQ6_K:
            tr.vec_dot_cols = MOEPOOL_VNNI_OR_AVX2(kVecDotQ6_KCols);
            break;
          default:
            break;
        }
      }
    }
    return t;
  }();
  return *tables;
}
#undef MOEPOOL_VNNI_OR_AVX2

}  // namespace

bool CpuHasAvx2() {
#if defined(MOEPOOL_HAVE_AVX2_KERNELS) && (defined(__x86_64__) || defined(__i386__))
  static const bool has = [] {
    unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
    // F16C is CPUID.1:ECX bit 29 (not every compiler's __builtin_cpu_supports knows it).
    const bool f16c = __get_cpuid(1, &eax, &ebx, &ecx, &edx) && (ecx & (1u << 29)) != 0;
    return f16c && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }();
  return has;
#else
  return false;
#endif
}

bool CpuHasAvx512Vnni() {
#if defined(MOEPOOL_HAVE_VNNI_KERNELS) && (defined(__x86_64__) || defined(__i386__))
  static const bool has =
      CpuHasAvx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vnni");
  return has;
#else
  return false;
#endif
}

const char* KernelIsaName() {
  if (g_force_scalar.load()) return "scalar";
  switch (FastestIsa()) {
    case Isa::kVnni:
      return "avx512-vnni";
    case Isa::kAvx2:
      return "avx2";
    default:
      return "scalar";
  }
}

bool SetForceScalarKernels(bool force) { return g_force_scalar.exchange(force); }

const TypeTraits* FindTypeTraits(uint32_t raw_type) {
  const Tables& t = GetTables();
  const int which = g_force_scalar.load(std::memory_order_relaxed) ? 0 : 1;
  for (const auto& tr : t.stored[which]) {
    if (static_cast<uint32_t>(tr.type) == raw_type) return &tr;
  }
  for (const auto& tr : t.activation[which]) {
    if (static_cast<uint32_t>(tr.type) == raw_type) return &tr;
  }
  return nullptr;
}

const TypeTraits& GetTypeTraits(TensorType type) {
  const TypeTraits* tr = FindTypeTraits(static_cast<uint32_t>(type));
  if (tr == nullptr) {
    std::fprintf(stderr, "moepool: internal error: unsupported tensor type %u\n",
                 static_cast<unsigned>(type));
    std::abort();
  }
  return *tr;
}

const TypeTraits* FindTypeTraitsByName(std::string_view name) {
  std::string upper;
  for (char c : name)
    upper.push_back(static_cast<char>(std::toupper(static_cast<unsigned char>(c))));
  const Tables& t = GetTables();
  const int which = g_force_scalar.load(std::memory_order_relaxed) ? 0 : 1;
  for (const auto& tr : t.stored[which]) {
    std::string n = tr.name;
    for (char& c : n) c = static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
    if (n == upper) return &tr;
  }
  return nullptr;
}

size_t RowBytes(TensorType type, int64_t n) {
  const TypeTraits& tr = GetTypeTraits(type);
  return static_cast<size_t>(n / tr.block_size) * tr.block_bytes;
}

}  // namespace moepool
