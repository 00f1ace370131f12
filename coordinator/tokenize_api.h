// POST /tokenize and POST /detokenize, as llama-server has them: text to token ids of the
// served model's vocabulary and back. Parsing and the response bodies live here; the HTTP
// server only routes (http_server.cc).
//
//   POST /tokenize    {"content": "text", "add_special": false, "with_pieces": false}
//                  -> {"tokens": [1, 22557]}   or, with_pieces,
//                     {"tokens": [{"id": 22557, "piece": "Hello"}, ...]} (a piece that is not
//                     valid UTF-8 on its own, e.g. one byte of a character, is an array of its
//                     byte values)
//   POST /detokenize  {"tokens": [1, 22557]} -> {"content": "Hello"}
//
// add_special adds the model's BOS token as generation does. Errors are INVALID_ARGUMENT naming
// the field (not JSON, content not a string, tokens not an array of ids of this vocabulary).
// Pure functions of the request and the tokenizer; thread-safe.
#ifndef MOEPOOL_COORDINATOR_TOKENIZE_API_H_
#define MOEPOOL_COORDINATOR_TOKENIZE_API_H_

#include <string>

#include "absl/status/statusor.h"
#include "engine/tokenizer.h"
#include "nlohmann/json.hpp"

namespace moepool {

// The response body of POST /tokenize for the request body `body`.
absl::StatusOr<nlohmann::json> TokenizeResponse(const Tokenizer& tokenizer,
                                                const std::string& body);

// The response body of POST /detokenize for the request body `body`.
absl::StatusOr<nlohmann::json> DetokenizeResponse(const Tokenizer& tokenizer,
                                                  const std::string& body);

}  // namespace moepool

#endif  // MOEPOOL_COORDINATOR_TOKENIZE_API_H_
