#include "coordinator/tokenize_api.h"

#include <cstdint>
#include <vector>

#include "absl/strings/str_cat.h"

namespace moepool {
namespace {

using json = nlohmann::json;

absl::StatusOr<json> ParseObject(const std::string& body) {
  json j = json::parse(body.begin(), body.end(), nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded() || !j.is_object()) {
    return absl::InvalidArgumentError("the request body must be a JSON object");
  }
  return j;
}

absl::StatusOr<bool> OptionalBool(const json& j, const char* key) {
  if (!j.contains(key)) return false;
  if (!j[key].is_boolean())
    return absl::InvalidArgumentError(absl::StrCat("'", key, "' must be a boolean"));
  return j[key].get<bool>();
}

// True if `s` is well-formed UTF-8 (no overlong forms, surrogates or values past U+10FFFF).
bool IsUtf8(const std::string& s) {
  size_t i = 0;
  while (i < s.size()) {
    const auto c = static_cast<unsigned char>(s[i]);
    int n = 0;
    uint32_t cp = 0;
    if (c < 0x80) {
      ++i;
      continue;
    } else if ((c & 0xE0) == 0xC0) {
      n = 1, cp = c & 0x1F;
    } else if ((c & 0xF0) == 0xE0) {
      n = 2, cp = c & 0x0F;
    } else if ((c & 0xF8) == 0xF0) {
      n = 3, cp = c & 0x07;
    } else {
      return false;
    }
    if (i + static_cast<size_t>(n) >= s.size()) return false;  // cut short
    for (int k = 1; k <= n; ++k) {
      const auto d = static_cast<unsigned char>(s[i + static_cast<size_t>(k)]);
      if ((d & 0xC0) != 0x80) return false;
      cp = (cp << 6) | (d & 0x3F);
    }
    static constexpr uint32_t kMin[] = {0, 0x80, 0x800, 0x10000};
    if (cp < kMin[n] || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return false;
    i += static_cast<size_t>(n) + 1;
  }
  return true;
}

json PieceJson(const std::string& piece) {
  if (IsUtf8(piece)) return piece;
  json bytes = json::array();
  for (const char c : piece) bytes.push_back(static_cast<unsigned char>(c));
  return bytes;
}

}  // namespace

absl::StatusOr<json> TokenizeResponse(const Tokenizer& tokenizer, const std::string& body) {
  absl::StatusOr<json> j = ParseObject(body);
  if (!j.ok()) return j.status();
  if (!j->contains("content") || !(*j)["content"].is_string()) {
    return absl::InvalidArgumentError("'content' is required and must be a string");
  }
  const absl::StatusOr<bool> add_special = OptionalBool(*j, "add_special");
  if (!add_special.ok()) return add_special.status();
  const absl::StatusOr<bool> with_pieces = OptionalBool(*j, "with_pieces");
  if (!with_pieces.ok()) return with_pieces.status();
  const std::vector<int32_t> ids =
      tokenizer.Encode((*j)["content"].get<std::string>(), *add_special);
  json tokens = json::array();
  for (const int32_t id : ids) {
    if (*with_pieces) {
      json token = json::object();
      token["id"] = id;
      token["piece"] = PieceJson(tokenizer.TokenToPiece(id));
      tokens.push_back(std::move(token));
    } else {
      tokens.push_back(id);
    }
  }
  return json{{"tokens", tokens}};
}

absl::StatusOr<json> DetokenizeResponse(const Tokenizer& tokenizer, const std::string& body) {
  absl::StatusOr<json> j = ParseObject(body);
  if (!j.ok()) return j.status();
  if (!j->contains("tokens") || !(*j)["tokens"].is_array()) {
    return absl::InvalidArgumentError("'tokens' is required and must be an array of token ids");
  }
  std::vector<int32_t> ids;
  for (const json& t : (*j)["tokens"]) {
    if (!t.is_number_integer() || t.get<int64_t>() < 0 || t.get<int64_t>() >= tokenizer.n_vocab()) {
      return absl::InvalidArgumentError(absl::StrCat("'tokens' must hold ids in [0, ",
                                                     tokenizer.n_vocab(), "), got ",
                                                     t.dump().substr(0, 64)));
    }
    ids.push_back(static_cast<int32_t>(t.get<int64_t>()));
  }
  return json{{"content", tokenizer.Decode(ids)}};
}

}  // namespace moepool
