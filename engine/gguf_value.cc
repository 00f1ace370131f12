// Constructors of GgufValue (the accessors and type names live with the reader in gguf.cc).
#include <string>
#include <utility>
#include <vector>

#include "engine/gguf.h"

namespace moepool {

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
  g.array.reserve(v.size());
  for (const std::string& s : v) g.array.push_back(String(s));
  return g;
}

GgufValue GgufValue::Float32Array(const std::vector<float>& v) {
  GgufValue g;
  g.type = GgufValueType::kArray;
  g.array_type = GgufValueType::kFloat32;
  g.array.reserve(v.size());
  for (float f : v) g.array.push_back(Float32(f));
  return g;
}

GgufValue GgufValue::Int32Array(const std::vector<int32_t>& v) {
  GgufValue g;
  g.type = GgufValueType::kArray;
  g.array_type = GgufValueType::kInt32;
  g.array.reserve(v.size());
  for (int32_t i : v) g.array.push_back(Int32(i));
  return g;
}

}  // namespace moepool
