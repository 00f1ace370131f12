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

#include "absl/status/statusor.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "engine/quant/kernels.h"

static_assert(moepool::kernels::kMultiCols == moepool::kMultiDotCols);

namespace moepool {
namespace {

// The fastest build of a kernel this CPU runs (kernels.h).
enum class Isa { kScalar, kAvx2, kVnni };
constexpr const char* kIsaNames[] = {"scalar", "avx2", "avx512-vnni"};

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

#ifdef MOEPOOL_HAVE_VNNI_KERNELS
#define MOEPOOL_SET_TILE(fn, scratch)          \
  if (isa == Isa::kVnni) {                     \
    tr.tile = &kernels::fn;                    \
    tr.tile_scratch_bytes = &kernels::scratch; \
  }
#else
#define MOEPOOL_SET_TILE(fn, scratch)
#endif

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

constexpr int kIsas = 3;  // indexes of Tables: Isa values

struct Tables {
  std::array<TypeTraits, 13> stored[kIsas];
  std::array<TypeTraits, 2> activation[kIsas];
};

Isa FastestIsa() {
  if (CpuHasAvx512Vnni()) return Isa::kVnni;
  return CpuHasAvx2() ? Isa::kAvx2 : Isa::kScalar;
}

void AddFastKernels(Isa isa, std::array<TypeTraits, 13>* stored) {
  // Q8_0 is both stored and an activation type: use the fast quantizer on the fast tables.
  for (auto& tr : *stored) {
    switch (tr.type) {
      case TensorType::kF16:
        tr.quantize = &kernels::QuantizeRowF16Avx2;
        tr.dequantize = &kernels::DequantizeRowF16Avx2;
        break;
      case TensorType::kQ8_0:
        tr.quantize = &kernels::QuantizeRowQ8_0Avx2;
        tr.vec_dot_cols = MOEPOOL_VNNI_OR_AVX2(kVecDotQ8_0Cols);
        MOEPOOL_SET_TILE(TileQ8_0Vnni, TileScratchBytesQ8_0);
        break;
      case TensorType::kQ4_K:
        tr.vec_dot_cols = MOEPOOL_VNNI_OR_AVX2(kVecDotQ4_KCols);
        MOEPOOL_SET_TILE(TileQ4_KVnni, TileScratchBytesK);
        break;
      case TensorType::kQ5_K:
        tr.vec_dot_cols = MOEPOOL_VNNI_OR_AVX2(kVecDotQ5_KCols);
        MOEPOOL_SET_TILE(TileQ5_KVnni, TileScratchBytesK);
        break;
      case TensorType::kQ6_K:
        tr.vec_dot_cols = MOEPOOL_VNNI_OR_AVX2(kVecDotQ6_KCols);
        MOEPOOL_SET_TILE(TileQ6_KVnni, TileScratchBytesK);
        break;
      default:
        break;
    }
  }
}

// Tables for every build this CPU runs (the others stay empty and are never selected).
const Tables& GetTables() {
  static const Tables* tables = [] {
    auto* t = new Tables;
    const int fastest = static_cast<int>(FastestIsa());
    for (int i = 0; i <= fastest; ++i) {
      const Isa isa = static_cast<Isa>(i);
      t->stored[i] = MakeTable(isa);
      t->activation[i] = MakeActivationTable(isa);
      if (isa != Isa::kScalar) AddFastKernels(isa, &t->stored[i]);
    }
    return t;
  }();
  return *tables;
}

// The selected build: -1 until first use, then an Isa value.
std::atomic<int> g_isa{-1};

absl::StatusOr<Isa> ParseIsa(std::string_view name) {
  if (name.empty() || name == "auto") return FastestIsa();
  Isa isa;
  if (name == "avx512" || name == "avx512-vnni") {
    isa = Isa::kVnni;
  } else if (name == "avx2") {
    isa = Isa::kAvx2;
  } else if (name == "scalar") {
    isa = Isa::kScalar;
  } else {
    return absl::InvalidArgumentError(absl::StrCat("unknown CPU kernels '", std::string(name),
                                                   "' (auto, avx512, avx2 or scalar)"));
  }
  if (static_cast<int>(isa) > static_cast<int>(FastestIsa())) {
    return absl::InvalidArgumentError(absl::StrCat(
        "CPU kernels '", std::string(name), "' cannot run here: this build on this CPU has ",
        kIsaNames[static_cast<int>(FastestIsa())], " at most"));
  }
  return isa;
}

int SelectedIsa() {
  int isa = g_isa.load(std::memory_order_relaxed);
  if (isa >= 0) return isa;
  const char* env = std::getenv("MOEPOOL_CPU_KERNELS");
  absl::StatusOr<Isa> parsed = ParseIsa(env == nullptr ? "" : env);
  if (!parsed.ok()) {
    std::fprintf(stderr, "moepool: MOEPOOL_CPU_KERNELS: %s; using %s\n",
                 std::string(parsed.status().message()).c_str(),
                 kIsaNames[static_cast<int>(FastestIsa())]);
    parsed = FastestIsa();
  }
  int expected = -1;
  g_isa.compare_exchange_strong(expected, static_cast<int>(*parsed));
  return g_isa.load(std::memory_order_relaxed);
}

#undef MOEPOOL_VNNI_OR_AVX2
#undef MOEPOOL_SET_TILE

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

const char* KernelIsaName() { return kIsaNames[SelectedIsa()]; }

absl::StatusOr<size_t> ParsePrefetchBytes(std::string_view text) {
  uint32_t bytes = 0;
  if (!absl::SimpleAtoi(std::string(text), &bytes) || bytes > 65536) {
    return absl::InvalidArgumentError(
        absl::StrCat("'", std::string(text), "' is not a number of bytes from 0 to 65536"));
  }
  return static_cast<size_t>(bytes);
}

size_t WeightPrefetchBytes() {
  static const size_t bytes = [] {
    const char* env = std::getenv("MOEPOOL_PREFETCH_BYTES");
    if (env == nullptr) return kDefaultPrefetchBytes;
    absl::StatusOr<size_t> parsed = ParsePrefetchBytes(env);
    if (parsed.ok()) return *parsed;
    std::fprintf(stderr, "moepool: MOEPOOL_PREFETCH_BYTES: %s; using %zu\n",
                 std::string(parsed.status().message()).c_str(), kDefaultPrefetchBytes);
    return kDefaultPrefetchBytes;
  }();
  return bytes;
}

bool UseAvx2Kernels() { return SelectedIsa() >= static_cast<int>(Isa::kAvx2); }
bool UseAvx512Kernels() { return SelectedIsa() >= static_cast<int>(Isa::kVnni); }

absl::Status SetCpuKernels(std::string_view name) {
  absl::StatusOr<Isa> isa = ParseIsa(name);
  if (!isa.ok()) return isa.status();
  g_isa.store(static_cast<int>(*isa));
  return absl::OkStatus();
}

const TypeTraits* FindTypeTraits(uint32_t raw_type) {
  const Tables& t = GetTables();
  const int which = SelectedIsa();
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
  const int which = SelectedIsa();
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
