// JSON schema -> JsonGrammar (json_grammar.h), for response_format json_schema and tool
// arguments.
//
// Supported: "type" (a name or a list of names: object, array, string, integer, number, boolean,
// null), properties / required / additionalProperties, items / minItems / maxItems,
// minLength / maxLength, enum, const, anyOf, a one-element allOf, nullable, integer minimum /
// maximum / exclusiveMinimum / exclusiveMaximum, $ref to "#" JSON pointers ($defs, definitions)
// without recursion, and the boolean schema true. Annotations (title, description, default,
// examples, $schema, $id, $comment, deprecated, readOnly, writeOnly) are ignored. Anything else
// is refused by name.
//
// Choices where JSON schema leaves room: objects with "properties" get exactly those properties
// (never additional ones, whatever additionalProperties says), in the listed order; an object
// without "properties" is a map whose values follow additionalProperties (any value if absent or
// true; "{}" only if false). A schema without "type" is inferred from its keywords (properties ->
// object, items -> array, minLength -> string, ...), or any JSON value.
//
// Errors are INVALID_ARGUMENT naming the place in the schema ("$.properties.age") and the
// keyword. Threading: stateless.
#ifndef MOEPOOL_COORDINATOR_JSON_SCHEMA_H_
#define MOEPOOL_COORDINATOR_JSON_SCHEMA_H_

#include <cstdint>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "coordinator/json_grammar.h"
#include "nlohmann/json.hpp"

namespace moepool {

struct JsonSchemaLimits {
  int max_depth = 32;                  // nested schemas (a hostile schema cannot recurse deeper)
  size_t max_nodes = 20000;            // grammar nodes per request
  size_t max_literal_bytes = 1 << 20;  // enum / const / key text per request
  int64_t max_length = 1 << 20;        // largest maxLength / maxItems accepted
};

// Adds the nodes for `schema` (evaluated against `root` for $ref) to `grammar`; returns the
// node. `path` names the schema in errors.
absl::StatusOr<int32_t> AddJsonSchema(const nlohmann::ordered_json& schema,
                                      const nlohmann::ordered_json& root, const std::string& path,
                                      JsonGrammar* grammar, const JsonSchemaLimits& limits = {});

// A node accepting any JSON value / any JSON object.
int32_t AddAnyJsonValue(JsonGrammar* grammar);
int32_t AddAnyJsonObject(JsonGrammar* grammar);

// A grammar whose text is one value of `schema` (leading whitespace allowed).
absl::StatusOr<std::shared_ptr<const JsonGrammar>> GrammarForJsonSchema(
    const nlohmann::ordered_json& schema, const JsonSchemaLimits& limits = {});
// A grammar whose text is one JSON object (response_format json_object).
std::shared_ptr<const JsonGrammar> GrammarForJsonObject();

}  // namespace moepool

#endif  // MOEPOOL_COORDINATOR_JSON_SCHEMA_H_
