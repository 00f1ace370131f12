#include "coordinator/json_schema.h"

#include <algorithm>
#include <cmath>
#include <map>
#include <set>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "engine/status_macros.h"

namespace moepool {
namespace {

using json = nlohmann::ordered_json;
using Kind = GrammarNode::Kind;

// The largest integer magnitude kMaxIntegerDigits digits can write.
constexpr int64_t kIntegerLimit = 999999999999999;

const std::set<std::string>& Annotations() {
  static const auto* s =
      new std::set<std::string>{"title", "description", "default",    "examples", "$schema",
                                "$id",   "$comment",    "deprecated", "readOnly", "writeOnly"};
  return *s;
}

const std::set<std::string>& Supported() {
  static const auto* s = new std::set<std::string>{"type",
                                                   "properties",
                                                   "required",
                                                   "additionalProperties",
                                                   "items",
                                                   "minItems",
                                                   "maxItems",
                                                   "minLength",
                                                   "maxLength",
                                                   "enum",
                                                   "const",
                                                   "anyOf",
                                                   "allOf",
                                                   "nullable",
                                                   "minimum",
                                                   "maximum",
                                                   "exclusiveMinimum",
                                                   "exclusiveMaximum",
                                                   "$ref",
                                                   "$defs",
                                                   "definitions"};
  return *s;
}

absl::Status SchemaError(const std::string& path, absl::string_view message) {
  return absl::InvalidArgumentError(absl::StrCat("schema ", path, ": ", message));
}

bool IsConstraint(const std::string& key) {
  return !Annotations().count(key) && key != "$defs" && key != "definitions";
}

class Compiler {
 public:
  Compiler(const json& root, JsonGrammar* g, const JsonSchemaLimits& limits)
      : root_(root), g_(g), limits_(limits) {}

  absl::StatusOr<int32_t> Compile(const json& s, const std::string& path, int depth) {
    if (depth > limits_.max_depth) return SchemaError(path, "nested too deeply");
    if (g_->nodes.size() > limits_.max_nodes) return SchemaError(path, "the schema is too large");
    if (s.is_boolean()) {
      if (s.get<bool>()) return AnyValue();
      return SchemaError(path, "the schema false accepts no value");
    }
    if (!s.is_object()) return SchemaError(path, "a schema must be an object or a boolean");
    for (const auto& [key, value] : s.items()) {
      if (!Annotations().count(key) && !Supported().count(key)) {
        return SchemaError(path, absl::StrCat("'", key, "' is not supported"));
      }
    }
    if (s.contains("$ref")) return Ref(s, path, depth);
    if (s.contains("allOf")) return AllOf(s, path, depth);
    if (const auto it = s.find("nullable"); it != s.end()) {
      if (!it->is_boolean()) return SchemaError(path, "'nullable' must be a boolean");
      if (it->get<bool>()) {
        json inner = s;
        inner.erase("nullable");
        ASSIGN_OR_RETURN(int32_t node, Compile(inner, path, depth + 1));
        return AnyOf({node, Literal({"null"})});
      }
    }
    if (s.contains("anyOf")) return AnyOfSchema(s, path, depth);
    if (s.contains("const")) return Literal({s["const"].dump()});
    std::vector<std::string> types;
    RETURN_IF_ERROR(Types(s, path, &types));
    if (s.contains("enum")) return Enum(s, types, path);
    if (types.empty()) return AnyValue();
    std::vector<int32_t> alternatives;
    for (const std::string& t : types) {
      ASSIGN_OR_RETURN(int32_t node, TypeNode(s, t, path, depth));
      alternatives.push_back(node);
    }
    return alternatives.size() == 1 ? alternatives[0] : AnyOf(alternatives);
  }

  int32_t AnyValue() {
    if (any_value_ >= 0) return any_value_;
    any_value_ = g_->Add(GrammarNode{.kind = Kind::kAnyOf});
    GrammarNode array{.kind = Kind::kArray};
    array.child = any_value_;
    GrammarNode map{.kind = Kind::kMap};
    map.key = String(0, -1);
    map.child = any_value_;
    std::vector<int32_t> children = {g_->Add(map), g_->Add(array), String(0, -1),
                                     g_->Add(GrammarNode{.kind = Kind::kNumber}),
                                     Literal({"true", "false", "null"})};
    g_->nodes[static_cast<size_t>(any_value_)].children = std::move(children);
    return any_value_;
  }

  int32_t AnyObject() {
    GrammarNode map{.kind = Kind::kMap};
    map.key = String(0, -1);
    map.child = AnyValue();
    return g_->Add(map);
  }

 private:
  int32_t Literal(const std::vector<std::string>& texts) {
    std::vector<std::pair<std::string, int32_t>> items;
    for (const std::string& t : texts) {
      literal_bytes_ += t.size();
      items.emplace_back(t, static_cast<int32_t>(items.size()));
    }
    return g_->AddLiterals(std::move(items));
  }

  int32_t String(int64_t min_length, int64_t max_length) {
    GrammarNode n{.kind = Kind::kString};
    n.min_length = min_length;
    n.max_length = max_length;
    return g_->Add(n);
  }

  int32_t AnyOf(std::vector<int32_t> children) {
    GrammarNode n{.kind = Kind::kAnyOf};
    n.children = std::move(children);
    return g_->Add(n);
  }

  absl::Status CheckLiteralBytes(const std::string& path) const {
    if (literal_bytes_ > limits_.max_literal_bytes) {
      return SchemaError(path, "enum, const and property names are too long in total");
    }
    return absl::OkStatus();
  }

  // The only keys besides `keyword` must be annotations.
  static absl::Status Alone(const json& s, const char* keyword, const std::string& path) {
    for (const auto& [key, value] : s.items()) {
      if (key != keyword && IsConstraint(key)) {
        return SchemaError(path,
                           absl::StrCat("'", key, "' beside '", keyword, "' is not supported"));
      }
    }
    return absl::OkStatus();
  }

  absl::StatusOr<int32_t> Ref(const json& s, const std::string& path, int depth) {
    RETURN_IF_ERROR(Alone(s, "$ref", path));
    const json& ref = s["$ref"];
    if (!ref.is_string()) return SchemaError(path, "'$ref' must be a string");
    const std::string target = ref.get<std::string>();
    if (target.empty() || target[0] != '#') {
      return SchemaError(path, absl::StrCat("'$ref' ", target,
                                            ": only references inside the "
                                            "schema (\"#/$defs/...\") are supported"));
    }
    if (auto it = refs_.find(target); it != refs_.end()) return it->second;
    if (open_refs_.count(target)) {
      return SchemaError(path, absl::StrCat("'$ref' ", target,
                                            " is recursive; recursive schemas are not supported"));
    }
    const json* resolved = nullptr;
    try {
      resolved = &root_.at(json::json_pointer(target.substr(1)));
    } catch (const json::exception&) {
      return SchemaError(path, absl::StrCat("'$ref' ", target, " does not resolve"));
    }
    open_refs_.insert(target);
    absl::StatusOr<int32_t> node = Compile(*resolved, target, depth + 1);
    open_refs_.erase(target);
    if (node.ok()) refs_[target] = *node;
    return node;
  }

  absl::StatusOr<int32_t> AllOf(const json& s, const std::string& path, int depth) {
    RETURN_IF_ERROR(Alone(s, "allOf", path));
    const json& all = s["allOf"];
    if (!all.is_array() || all.size() != 1) {
      return SchemaError(path, "'allOf' is supported with exactly one schema");
    }
    return Compile(all[0], path + ".allOf[0]", depth + 1);
  }

  absl::StatusOr<int32_t> AnyOfSchema(const json& s, const std::string& path, int depth) {
    RETURN_IF_ERROR(Alone(s, "anyOf", path));
    const json& any = s["anyOf"];
    if (!any.is_array() || any.empty()) {
      return SchemaError(path, "'anyOf' must be a non-empty array of schemas");
    }
    std::vector<int32_t> children;
    for (size_t i = 0; i < any.size(); ++i) {
      ASSIGN_OR_RETURN(int32_t node,
                       Compile(any[i], absl::StrCat(path, ".anyOf[", i, "]"), depth + 1));
      children.push_back(node);
    }
    return children.size() == 1 ? children[0] : AnyOf(std::move(children));
  }

  // The listed types, or those the keywords imply, or none (any value).
  static absl::Status Types(const json& s, const std::string& path,
                            std::vector<std::string>* types) {
    static const std::set<std::string> known = {"object", "array",   "string", "integer",
                                                "number", "boolean", "null"};
    if (const auto it = s.find("type"); it != s.end()) {
      std::vector<json> names =
          it->is_array() ? it->get<std::vector<json>>() : std::vector<json>{*it};
      if (names.empty()) return SchemaError(path, "'type' must not be an empty list");
      for (const json& n : names) {
        if (!n.is_string() || !known.count(n.get<std::string>())) {
          return SchemaError(path, absl::StrCat("'type' ", n.dump(), " is not a JSON type (",
                                                absl::StrJoin(known, ", "), ")"));
        }
        const std::string t = n.get<std::string>();
        if (std::find(types->begin(), types->end(), t) == types->end()) types->push_back(t);
      }
      return absl::OkStatus();
    }
    auto has = [&](std::initializer_list<const char*> keys) {
      for (const char* k : keys) {
        if (s.contains(k)) return true;
      }
      return false;
    };
    if (has({"properties", "required", "additionalProperties"})) types->push_back("object");
    if (has({"items", "minItems", "maxItems"})) types->push_back("array");
    if (has({"minLength", "maxLength"})) types->push_back("string");
    if (has({"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"})) {
      types->push_back("integer");
    }
    if (types->size() > 1) {
      return SchemaError(path, "the keywords mix types; say which with 'type'");
    }
    return absl::OkStatus();
  }

  static bool MatchesType(const json& v, const std::string& t) {
    if (t == "object") return v.is_object();
    if (t == "array") return v.is_array();
    if (t == "string") return v.is_string();
    if (t == "integer") {
      return v.is_number_integer() ||
             (v.is_number_float() && std::floor(v.get<double>()) == v.get<double>());
    }
    if (t == "number") return v.is_number();
    if (t == "boolean") return v.is_boolean();
    return v.is_null();
  }

  absl::StatusOr<int32_t> Enum(const json& s, const std::vector<std::string>& types,
                               const std::string& path) {
    const json& values = s["enum"];
    if (!values.is_array() || values.empty()) {
      return SchemaError(path, "'enum' must be a non-empty array");
    }
    std::vector<std::string> texts;
    for (const json& v : values) {
      bool ok = types.empty();
      for (const std::string& t : types) ok = ok || MatchesType(v, t);
      if (ok) texts.push_back(v.dump());
    }
    if (texts.empty()) return SchemaError(path, "no 'enum' value has the schema's 'type'");
    const int32_t node = Literal(texts);
    RETURN_IF_ERROR(CheckLiteralBytes(path));
    return node;
  }

  absl::StatusOr<int64_t> Count(const json& s, const char* key, int64_t fallback,
                                const std::string& path) const {
    const auto it = s.find(key);
    if (it == s.end()) return fallback;
    if (!it->is_number_unsigned() && !(it->is_number_integer() && it->get<int64_t>() >= 0)) {
      return SchemaError(path, absl::StrCat("'", key, "' must be a non-negative integer"));
    }
    if (it->get<uint64_t>() > static_cast<uint64_t>(limits_.max_length)) {
      return SchemaError(path, absl::StrCat("'", key, "' is larger than ", limits_.max_length));
    }
    return it->get<int64_t>();
  }

  absl::StatusOr<int32_t> TypeNode(const json& s, const std::string& t, const std::string& path,
                                   int depth) {
    if (t == "object") return Object(s, path, depth);
    if (t == "array") return Array(s, path, depth);
    if (t == "string") {
      ASSIGN_OR_RETURN(int64_t min, Count(s, "minLength", 0, path));
      ASSIGN_OR_RETURN(int64_t max, Count(s, "maxLength", -1, path));
      if (max >= 0 && min > max) return SchemaError(path, "'minLength' is above 'maxLength'");
      return String(min, max);
    }
    if (t == "integer") return Integer(s, path);
    if (t == "number") {
      for (const char* k : {"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"}) {
        if (s.contains(k)) {
          return SchemaError(path, absl::StrCat("'", k,
                                                "' is supported for type integer, not "
                                                "number"));
        }
      }
      return g_->Add(GrammarNode{.kind = Kind::kNumber});
    }
    if (t == "boolean") return Literal({"true", "false"});
    return Literal({"null"});
  }

  absl::StatusOr<int32_t> Integer(const json& s, const std::string& path) {
    int64_t lo = -kIntegerLimit, hi = kIntegerLimit;
    auto bound = [&](const char* key, bool upper, bool exclusive) -> absl::Status {
      const auto it = s.find(key);
      if (it == s.end()) return absl::OkStatus();
      if (!it->is_number()) return SchemaError(path, absl::StrCat("'", key, "' must be a number"));
      const double x = it->get<double>();
      double b = upper ? std::floor(x) : std::ceil(x);
      if (exclusive && b == x) b += upper ? -1 : 1;
      const double limit = static_cast<double>(kIntegerLimit) + 1;
      const int64_t clamped = static_cast<int64_t>(std::clamp(b, -limit, limit));
      if (upper) {
        hi = std::min(hi, clamped);
      } else {
        lo = std::max(lo, clamped);
      }
      return absl::OkStatus();
    };
    RETURN_IF_ERROR(bound("minimum", false, false));
    RETURN_IF_ERROR(bound("exclusiveMinimum", false, true));
    RETURN_IF_ERROR(bound("maximum", true, false));
    RETURN_IF_ERROR(bound("exclusiveMaximum", true, true));
    if (lo > hi) {
      return SchemaError(path, absl::StrCat("no integer of at most ", kMaxIntegerDigits,
                                            " digits lies within the bounds"));
    }
    GrammarNode n{.kind = Kind::kInteger};
    n.min_value = lo;
    n.max_value = hi;
    return g_->Add(n);
  }

  absl::StatusOr<int32_t> Array(const json& s, const std::string& path, int depth) {
    ASSIGN_OR_RETURN(int64_t min, Count(s, "minItems", 0, path));
    ASSIGN_OR_RETURN(int64_t max, Count(s, "maxItems", -1, path));
    if (max >= 0 && min > max) return SchemaError(path, "'minItems' is above 'maxItems'");
    GrammarNode n{.kind = Kind::kArray};
    n.min_length = min;
    n.max_length = max;
    if (const auto it = s.find("items"); it != s.end()) {
      if (it->is_array()) return SchemaError(path, "'items' as a list (tuples) is not supported");
      ASSIGN_OR_RETURN(n.child, Compile(*it, path + ".items", depth + 1));
    } else {
      n.child = AnyValue();
    }
    return g_->Add(n);
  }

  absl::StatusOr<int32_t> Object(const json& s, const std::string& path, int depth);

  const json& root_;
  JsonGrammar* g_;
  JsonSchemaLimits limits_;
  std::map<std::string, int32_t> refs_;
  std::set<std::string> open_refs_;
  int32_t any_value_ = -1;
  size_t literal_bytes_ = 0;
};

absl::StatusOr<int32_t> Compiler::Object(const json& s, const std::string& path, int depth) {
  const json empty = json::object();
  const auto props_it = s.find("properties");
  const json& props = props_it == s.end() ? empty : *props_it;
  if (!props.is_object()) return SchemaError(path, "'properties' must be an object");
  std::vector<std::string> names;
  for (const auto& [name, sub] : props.items()) names.push_back(name);
  std::set<std::string> required;
  if (const auto it = s.find("required"); it != s.end()) {
    if (!it->is_array()) return SchemaError(path, "'required' must be an array of names");
    for (const json& r : *it) {
      if (!r.is_string()) return SchemaError(path, "'required' must be an array of names");
      if (!props.contains(r.get<std::string>())) {
        return SchemaError(path, absl::StrCat("required property '", r.get<std::string>(),
                                              "' is not in 'properties'"));
      }
      required.insert(r.get<std::string>());
    }
  }
  const auto extra = s.find("additionalProperties");
  if (extra != s.end() && !extra->is_boolean() && !extra->is_object()) {
    return SchemaError(path, "'additionalProperties' must be a boolean or a schema");
  }
  if (names.empty() && !(extra != s.end() && extra->is_boolean() && !extra->get<bool>())) {
    GrammarNode map{.kind = Kind::kMap};
    map.key = String(0, -1);
    if (extra != s.end() && extra->is_object()) {
      ASSIGN_OR_RETURN(map.child, Compile(*extra, path + ".additionalProperties", depth + 1));
    } else {
      map.child = AnyValue();
    }
    return g_->Add(map);
  }
  GrammarNode n{.kind = Kind::kObject};
  for (const std::string& name : names) {
    ASSIGN_OR_RETURN(int32_t child,
                     Compile(props[name], absl::StrCat(path, ".properties.", name), depth + 1));
    n.children.push_back(child);
  }
  // Keys that may come when property i is next: i.. up to and including the first required.
  const size_t count = names.size();
  for (size_t i = 0; i <= count; ++i) {
    std::vector<std::string> keys;
    bool closable = true;
    for (size_t j = i; j < count; ++j) {
      keys.push_back(json(names[j]).dump());
      if (required.count(names[j])) {
        closable = false;
        break;
      }
    }
    std::vector<std::pair<std::string, int32_t>> tagged;
    for (size_t k = 0; k < keys.size(); ++k) {
      literal_bytes_ += keys[k].size();
      tagged.emplace_back(keys[k], static_cast<int32_t>(i + k));
    }
    n.key_nodes.push_back(tagged.empty() ? -1 : g_->AddLiterals(std::move(tagged)));
    n.closable.push_back(closable);
  }
  RETURN_IF_ERROR(CheckLiteralBytes(path));
  return g_->Add(n);
}

int32_t AddRoot(JsonGrammar* g, int32_t child) {
  GrammarNode root{.kind = Kind::kPrefixed};
  root.child = child;
  return g->Add(root);
}

}  // namespace

absl::StatusOr<int32_t> AddJsonSchema(const json& schema, const json& root, const std::string& path,
                                      JsonGrammar* grammar, const JsonSchemaLimits& limits) {
  Compiler compiler(root, grammar, limits);
  return compiler.Compile(schema, path, 0);
}

int32_t AddAnyJsonValue(JsonGrammar* grammar) {
  const json none;
  return Compiler(none, grammar, {}).AnyValue();
}

int32_t AddAnyJsonObject(JsonGrammar* grammar) {
  const json none;
  return Compiler(none, grammar, {}).AnyObject();
}

absl::StatusOr<std::shared_ptr<const JsonGrammar>> GrammarForJsonSchema(
    const json& schema, const JsonSchemaLimits& limits) {
  auto g = std::make_shared<JsonGrammar>();
  ASSIGN_OR_RETURN(int32_t node, AddJsonSchema(schema, schema, "$", g.get(), limits));
  g->root = AddRoot(g.get(), node);
  return std::shared_ptr<const JsonGrammar>(std::move(g));
}

std::shared_ptr<const JsonGrammar> GrammarForJsonObject() {
  auto g = std::make_shared<JsonGrammar>();
  g->root = AddRoot(g.get(), AddAnyJsonObject(g.get()));
  return g;
}

}  // namespace moepool
