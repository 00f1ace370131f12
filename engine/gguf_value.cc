// GgufValue: type names, the fixed-size encodings shared by the reader and the writer, array
// access and constructors (the file reader lives in gguf.cc).
#include <cstring>
#include <string>
#include <utility>
#include <vector>

#include "engine/gguf.h"

namespace moepool {
namespace {

template <typename T>
void AppendRaw(T v, std::string* out) {
  out->append(reinterpret_cast<const char*>(&v), sizeof(T));
}

template <typename T>
T LoadRaw(const uint8_t* p) {
  T v;
  std::memcpy(&v, p, sizeof(T));
  return v;
}

}  // namespace

const char* GgufValueTypeName(GgufValueType type) {
  switch (type) {
    case GgufValueType::kUint8:
      return "uint8";
    case GgufValueType::kInt8:
      return "int8";
    case GgufValueType::kUint16:
      return "uint16";
    case GgufValueType::kInt16:
      return "int16";
    case GgufValueType::kUint32:
      return "uint32";
    case GgufValueType::kInt32:
      return "int32";
    case GgufValueType::kFloat32:
      return "float32";
    case GgufValueType::kBool:
      return "bool";
    case GgufValueType::kString:
      return "string";
    case GgufValueType::kArray:
      return "array";
    case GgufValueType::kUint64:
      return "uint64";
    case GgufValueType::kInt64:
      return "int64";
    case GgufValueType::kFloat64:
      return "float64";
  }
  return "unknown";
}

uint64_t GgufScalarSize(GgufValueType type) {
  switch (type) {
    case GgufValueType::kUint8:
    case GgufValueType::kInt8:
    case GgufValueType::kBool:
      return 1;
    case GgufValueType::kUint16:
    case GgufValueType::kInt16:
      return 2;
    case GgufValueType::kUint32:
    case GgufValueType::kInt32:
    case GgufValueType::kFloat32:
      return 4;
    case GgufValueType::kUint64:
    case GgufValueType::kInt64:
    case GgufValueType::kFloat64:
      return 8;
    case GgufValueType::kString:
    case GgufValueType::kArray:
      return 0;
  }
  return 0;
}

bool GgufValue::IsInteger() const { return GgufIsIntegerType(type); }

bool GgufIsIntegerType(GgufValueType type) {
  switch (type) {
    case GgufValueType::kUint8:
    case GgufValueType::kInt8:
    case GgufValueType::kUint16:
    case GgufValueType::kInt16:
    case GgufValueType::kUint32:
    case GgufValueType::kInt32:
    case GgufValueType::kUint64:
    case GgufValueType::kInt64:
      return true;
    default:
      return false;
  }
}

bool GgufValue::IsFloat() const {
  return type == GgufValueType::kFloat32 || type == GgufValueType::kFloat64;
}

double GgufValue::AsDouble() const {
  if (IsFloat()) return float_value;
  switch (type) {
    case GgufValueType::kInt8:
    case GgufValueType::kInt16:
    case GgufValueType::kInt32:
    case GgufValueType::kInt64:
      return static_cast<double>(int_value);
    default:
      return static_cast<double>(uint_value);
  }
}

void GgufValue::AppendScalar(std::string* out) const {
  switch (type) {
    case GgufValueType::kUint8:
      return AppendRaw(static_cast<uint8_t>(uint_value), out);
    case GgufValueType::kInt8:
      return AppendRaw(static_cast<int8_t>(int_value), out);
    case GgufValueType::kUint16:
      return AppendRaw(static_cast<uint16_t>(uint_value), out);
    case GgufValueType::kInt16:
      return AppendRaw(static_cast<int16_t>(int_value), out);
    case GgufValueType::kUint32:
      return AppendRaw(static_cast<uint32_t>(uint_value), out);
    case GgufValueType::kInt32:
      return AppendRaw(static_cast<int32_t>(int_value), out);
    case GgufValueType::kFloat32:
      return AppendRaw(static_cast<float>(float_value), out);
    case GgufValueType::kBool:
      return AppendRaw(static_cast<uint8_t>(uint_value != 0 ? 1 : 0), out);
    case GgufValueType::kUint64:
      return AppendRaw(uint_value, out);
    case GgufValueType::kInt64:
      return AppendRaw(int_value, out);
    case GgufValueType::kFloat64:
      return AppendRaw(float_value, out);
    case GgufValueType::kString:
    case GgufValueType::kArray:
      return;  // not fixed-size: the writer encodes these itself
  }
}

GgufValue GgufValue::DecodeScalar(GgufValueType type, const uint8_t* bytes) {
  GgufValue v;
  v.type = type;
  switch (type) {
    case GgufValueType::kUint8:
    case GgufValueType::kBool:
      v.uint_value = LoadRaw<uint8_t>(bytes);
      if (type == GgufValueType::kBool) v.uint_value = v.uint_value != 0 ? 1 : 0;
      break;
    case GgufValueType::kInt8:
      v.int_value = LoadRaw<int8_t>(bytes);
      break;
    case GgufValueType::kUint16:
      v.uint_value = LoadRaw<uint16_t>(bytes);
      break;
    case GgufValueType::kInt16:
      v.int_value = LoadRaw<int16_t>(bytes);
      break;
    case GgufValueType::kUint32:
      v.uint_value = LoadRaw<uint32_t>(bytes);
      break;
    case GgufValueType::kInt32:
      v.int_value = LoadRaw<int32_t>(bytes);
      break;
    case GgufValueType::kFloat32:
      v.float_value = LoadRaw<float>(bytes);
      break;
    case GgufValueType::kUint64:
      v.uint_value = LoadRaw<uint64_t>(bytes);
      break;
    case GgufValueType::kInt64:
      v.int_value = LoadRaw<int64_t>(bytes);
      break;
    case GgufValueType::kFloat64:
      v.float_value = LoadRaw<double>(bytes);
      break;
    case GgufValueType::kString:
    case GgufValueType::kArray:
      break;
  }
  return v;
}

uint64_t GgufValue::ArraySize() const {
  if (type != GgufValueType::kArray) return 0;
  if (array_type == GgufValueType::kString) return strings.size();
  const uint64_t elem = GgufScalarSize(array_type);
  return elem == 0 ? 0 : packed.size() / elem;
}

GgufValue GgufValue::ArrayElement(uint64_t i) const {
  if (array_type == GgufValueType::kString) return String(strings[i]);
  const uint64_t elem = GgufScalarSize(array_type);
  return DecodeScalar(array_type, reinterpret_cast<const uint8_t*>(packed.data()) + i * elem);
}

GgufValue GgufValue::Uint32(uint32_t v) {
  GgufValue g;
  g.type = GgufValueType::kUint32;
  g.uint_value = v;
  return g;
}

GgufValue GgufValue::Int32(int32_t v) {
  GgufValue g;
  g.type = GgufValueType::kInt32;
  g.int_value = v;
  return g;
}

GgufValue GgufValue::Uint64(uint64_t v) {
  GgufValue g;
  g.type = GgufValueType::kUint64;
  g.uint_value = v;
  return g;
}

GgufValue GgufValue::Float32(float v) {
  GgufValue g;
  g.type = GgufValueType::kFloat32;
  g.float_value = v;
  return g;
}

GgufValue GgufValue::Bool(bool v) {
  GgufValue g;
  g.type = GgufValueType::kBool;
  g.uint_value = v ? 1 : 0;
  return g;
}

GgufValue GgufValue::String(std::string v) {
  GgufValue g;
  g.type = GgufValueType::kString;
  g.string_value = std::move(v);
  return g;
}

GgufValue GgufValue::StringArray(const std::vector<std::string>& v) {
  GgufValue g;
  g.type = GgufValueType::kArray;
  g.array_type = GgufValueType::kString;
  g.strings = v;
  return g;
}

GgufValue GgufValue::Float32Array(const std::vector<float>& v) {
  GgufValue g;
  g.type = GgufValueType::kArray;
  g.array_type = GgufValueType::kFloat32;
  for (float f : v) AppendRaw(f, &g.packed);
  return g;
}

GgufValue GgufValue::Int32Array(const std::vector<int32_t>& v) {
  GgufValue g;
  g.type = GgufValueType::kArray;
  g.array_type = GgufValueType::kInt32;
  for (int32_t i : v) AppendRaw(i, &g.packed);
  return g;
}

GgufValue GgufValue::Array(GgufValueType element_type, const std::vector<GgufValue>& elements) {
  GgufValue g;
  g.type = GgufValueType::kArray;
  g.array_type = element_type;
  for (const GgufValue& e : elements) {
    if (element_type == GgufValueType::kString) {
      g.strings.push_back(e.string_value);
      continue;
    }
    GgufValue converted = e;
    converted.type = element_type;
    converted.AppendScalar(&g.packed);
  }
  return g;
}

}  // namespace moepool
