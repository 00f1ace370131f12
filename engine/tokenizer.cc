#include "engine/tokenizer.h"

#include <algorithm>
#include <cstdint>
#include <queue>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "engine/status_macros.h"

namespace moepool {
namespace {

constexpr std::string_view kSpaceMarker = "\xE2\x96\x81";      // U+2581 "▁"
constexpr std::string_view kUnknownPiece = "\xE2\x96\x85";     // U+2585 "▅"
constexpr std::string_view kReplacementChar = "\xEF\xBF\xBD";  // U+FFFD

constexpr std::string_view kModelKey = "tokenizer.ggml.model";
constexpr std::string_view kTokensKey = "tokenizer.ggml.tokens";
constexpr std::string_view kScoresKey = "tokenizer.ggml.scores";
constexpr std::string_view kTokenTypeKey = "tokenizer.ggml.token_type";

// (absl::string_view is not std::string_view in this Abseil build, hence the copies.)
absl::Status MetadataError(const GgufFile& file, std::string_view key, const std::string& what) {
  return absl::InvalidArgumentError(absl::StrCat(file.path(), ": ", std::string(key), ": ", what));
}

// Length of the UTF-8 sequence a lead byte announces, judged by its high nibble alone (as
// SentencePiece and llama.cpp split text into symbols); stray continuation bytes count as 1.
size_t Utf8LengthFromLead(uint8_t lead) {
  static constexpr uint8_t kLengths[16] = {1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 3, 4};
  return kLengths[lead >> 4];
}

// Parses "<0xNN>" (two hex digits); -1 if `text` has another form.
int ParseByteTokenText(std::string_view text) {
  if (text.size() != 6 || text.substr(0, 3) != "<0x" || text[5] != '>') return -1;
  int value = 0;
  for (char c : text.substr(3, 2)) {
    int digit;
    if (c >= '0' && c <= '9') {
      digit = c - '0';
    } else if (c >= 'A' && c <= 'F') {
      digit = c - 'A' + 10;
    } else if (c >= 'a' && c <= 'f') {
      digit = c - 'a' + 10;
    } else {
      return -1;
    }
    value = value * 16 + digit;
  }
  return value;
}

// Replaces every U+2581 in `piece` by a space.
std::string UnescapeSpaces(std::string_view piece) {
  std::string out;
  out.reserve(piece.size());
  size_t pos = 0;
  while (true) {
    const size_t hit = piece.find(kSpaceMarker, pos);
    if (hit == std::string_view::npos) break;
    out.append(piece, pos, hit - pos);
    out.push_back(' ');
    pos = hit + kSpaceMarker.size();
  }
  out.append(piece, pos, std::string_view::npos);
  return out;
}

// Reads an optional token id; `*id` keeps its default when the key is absent. A default outside
// the vocabulary becomes -1 (none).
absl::Status ReadTokenId(const GgufFile& file, std::string_view key, int32_t n_vocab, int32_t* id) {
  if (!file.Has(key)) {
    if (*id >= n_vocab) *id = -1;
    return absl::OkStatus();
  }
  ASSIGN_OR_RETURN(const uint64_t value, file.GetUint(key));
  if (value >= static_cast<uint64_t>(n_vocab)) {
    return MetadataError(file, key,
                         absl::StrCat("token id ", value, " outside the vocabulary of ", n_vocab));
  }
  *id = static_cast<int32_t>(value);
  return absl::OkStatus();
}

absl::Status ReadFlag(const GgufFile& file, std::string_view key, bool* flag) {
  if (!file.Has(key)) return absl::OkStatus();
  ASSIGN_OR_RETURN(*flag, file.GetBool(key));
  return absl::OkStatus();
}

// Classifies the UTF-8 sequence at the start of `bytes` (non-empty) by the rules of Unicode
// Table 3-7. Returns the number of bytes it spans; `*valid` says whether they form a character,
// `*incomplete` whether they are a valid prefix cut short by the end of `bytes`.
size_t ClassifyUtf8(std::string_view bytes, bool* valid, bool* incomplete) {
  const auto lead = static_cast<uint8_t>(bytes[0]);
  *valid = false;
  *incomplete = false;
  if (lead < 0x80) {
    *valid = true;
    return 1;
  }
  size_t need;
  uint8_t lo = 0x80, hi = 0xBF;  // allowed range of the second byte
  if (lead >= 0xC2 && lead <= 0xDF) {
    need = 2;
  } else if (lead >= 0xE0 && lead <= 0xEF) {
    need = 3;
    if (lead == 0xE0) lo = 0xA0;
    if (lead == 0xED) hi = 0x9F;
  } else if (lead >= 0xF0 && lead <= 0xF4) {
    need = 4;
    if (lead == 0xF0) lo = 0x90;
    if (lead == 0xF4) hi = 0x8F;
  } else {
    return 1;  // stray continuation byte, overlong lead C0/C1, or F5..FF
  }
  for (size_t i = 1; i < need; ++i) {
    if (i >= bytes.size()) {
      *incomplete = true;
      return i;
    }
    const auto b = static_cast<uint8_t>(bytes[i]);
    const bool ok = i == 1 ? (b >= lo && b <= hi) : (b >= 0x80 && b <= 0xBF);
    if (!ok) return i;  // the maximal invalid subpart ends before this byte
  }
  *valid = true;
  return need;
}

struct Symbol {
  int32_t prev;
  int32_t next;
  uint32_t offset;  // into the escaped text
  uint32_t length;  // bytes; 0 once merged into its left neighbour
};

struct Bigram {
  float score;
  int32_t left;   // symbol index
  int32_t right;  // symbol index
  uint32_t length;
};

// Max-heap order: highest score first, then leftmost.
struct BigramLess {
  bool operator()(const Bigram& a, const Bigram& b) const {
    return a.score < b.score || (a.score == b.score && a.left > b.left);
  }
};

}  // namespace

absl::StatusOr<std::unique_ptr<Tokenizer>> Tokenizer::FromGguf(const GgufFile& file) {
  if (!file.Has(kModelKey)) return MetadataError(file, kModelKey, "missing");
  ASSIGN_OR_RETURN(const std::string model, file.GetString(kModelKey));
  if (model != "llama") {
    return MetadataError(file, kModelKey,
                         absl::StrCat("unsupported tokenizer model \"", model,
                                      "\" (only \"llama\", SentencePiece BPE, is supported)"));
  }
  if (!file.Has(kTokensKey)) return MetadataError(file, kTokensKey, "missing");
  auto tok = std::unique_ptr<Tokenizer>(new Tokenizer());
  ASSIGN_OR_RETURN(tok->texts_, file.GetStringArray(kTokensKey));
  const size_t n = tok->texts_.size();
  if (n == 0) return MetadataError(file, kTokensKey, "empty vocabulary");
  if (n > static_cast<size_t>(INT32_MAX)) return MetadataError(file, kTokensKey, "too many tokens");
  const auto n_vocab = static_cast<int32_t>(n);

  if (file.Has(kScoresKey)) {
    ASSIGN_OR_RETURN(tok->scores_, file.GetFloatArray(kScoresKey));
    if (tok->scores_.size() != n) {
      return MetadataError(file, kScoresKey,
                           absl::StrCat(tok->scores_.size(), " scores for ", n, " tokens"));
    }
  } else {
    tok->scores_.assign(n, 0.0f);
  }

  tok->types_.assign(n, VocabTokenType::kNormal);
  if (file.Has(kTokenTypeKey)) {
    ASSIGN_OR_RETURN(const std::vector<int64_t> types, file.GetIntArray(kTokenTypeKey));
    if (types.size() != n) {
      return MetadataError(file, kTokenTypeKey,
                           absl::StrCat(types.size(), " token types for ", n, " tokens"));
    }
    for (size_t i = 0; i < n; ++i) {
      if (types[i] < 0 || types[i] > static_cast<int64_t>(VocabTokenType::kByte)) {
        return MetadataError(file, kTokenTypeKey,
                             absl::StrCat("token ", i, " has unknown type ", types[i]));
      }
      tok->types_[i] = static_cast<VocabTokenType>(types[i]);
    }
  }

  tok->byte_values_.assign(n, -1);
  tok->piece_to_id_.reserve(n);
  for (size_t i = 0; i < n; ++i) {
    const std::string& text = tok->texts_[i];
    // On duplicate texts the later id wins, as in llama.cpp.
    tok->piece_to_id_[text] = static_cast<int32_t>(i);
    if (tok->types_[i] == VocabTokenType::kByte) {
      const int value = ParseByteTokenText(text);
      if (value < 0) {
        return MetadataError(
            file, kTokenTypeKey,
            absl::StrCat("byte token ", i, " has text \"", text, "\", expected \"<0xNN>\""));
      }
      tok->byte_values_[i] = static_cast<int16_t>(value);
    }
  }
  for (int b = 0; b < 256; ++b) {
    tok->byte_to_id_[b] = tok->PieceToId(absl::StrFormat("<0x%02X>", b));
  }

  tok->bos_id_ = 1;
  tok->eos_id_ = 2;
  tok->unk_id_ = 0;
  RETURN_IF_ERROR(ReadTokenId(file, "tokenizer.ggml.bos_token_id", n_vocab, &tok->bos_id_));
  RETURN_IF_ERROR(ReadTokenId(file, "tokenizer.ggml.eos_token_id", n_vocab, &tok->eos_id_));
  RETURN_IF_ERROR(ReadTokenId(file, "tokenizer.ggml.unknown_token_id", n_vocab, &tok->unk_id_));
  RETURN_IF_ERROR(ReadTokenId(file, "tokenizer.ggml.eot_token_id", n_vocab, &tok->eot_id_));
  RETURN_IF_ERROR(ReadFlag(file, "tokenizer.ggml.add_bos_token", &tok->add_bos_));
  RETURN_IF_ERROR(ReadFlag(file, "tokenizer.ggml.add_eos_token", &tok->add_eos_));
  RETURN_IF_ERROR(ReadFlag(file, "tokenizer.ggml.add_space_prefix", &tok->add_space_prefix_));
  return tok;
}

int32_t Tokenizer::PieceToId(std::string_view piece) const {
  const auto it = piece_to_id_.find(piece);
  return it == piece_to_id_.end() ? -1 : it->second;
}

std::vector<int32_t> Tokenizer::Encode(std::string_view text, bool add_bos) const {
  std::vector<int32_t> ids;
  if (add_bos && bos_id_ >= 0) ids.push_back(bos_id_);
  if (text.empty()) return ids;

  std::string escaped;
  escaped.reserve(text.size() + text.size() / 2 + kSpaceMarker.size());
  if (add_space_prefix_) escaped.append(kSpaceMarker);
  for (char c : text) {
    if (c == ' ') {
      escaped.append(kSpaceMarker);
    } else {
      escaped.push_back(c);
    }
  }

  // One symbol per UTF-8 character, in a doubly linked list.
  std::vector<Symbol> symbols;
  symbols.reserve(escaped.size());
  for (size_t offset = 0; offset < escaped.size();) {
    const size_t length = std::min(Utf8LengthFromLead(static_cast<uint8_t>(escaped[offset])),
                                   escaped.size() - offset);
    const auto index = static_cast<int32_t>(symbols.size());
    symbols.push_back(
        Symbol{index - 1, index + 1, static_cast<uint32_t>(offset), static_cast<uint32_t>(length)});
    offset += length;
  }
  symbols.back().next = -1;

  std::priority_queue<Bigram, std::vector<Bigram>, BigramLess> queue;
  auto try_add_bigram = [&](int32_t left, int32_t right) {
    if (left < 0 || right < 0) return;
    const uint32_t length = symbols[left].length + symbols[right].length;
    const int32_t id = PieceToId(std::string_view(escaped).substr(symbols[left].offset, length));
    if (id < 0) return;
    queue.push(Bigram{scores_[id], left, right, length});
  };
  for (size_t i = 1; i < symbols.size(); ++i) {
    try_add_bigram(static_cast<int32_t>(i - 1), static_cast<int32_t>(i));
  }

  while (!queue.empty()) {
    const Bigram bigram = queue.top();
    queue.pop();
    Symbol& left = symbols[bigram.left];
    Symbol& right = symbols[bigram.right];
    // Stale entries: a side was merged away, or grew (lengths only grow, so the sum changes).
    if (left.length == 0 || right.length == 0 || left.length + right.length != bigram.length) {
      continue;
    }
    left.length += right.length;
    right.length = 0;
    left.next = right.next;
    if (right.next >= 0) symbols[right.next].prev = bigram.left;
    try_add_bigram(left.prev, bigram.left);
    try_add_bigram(bigram.left, left.next);
  }

  for (int32_t i = 0; i >= 0; i = symbols[i].next) {
    const std::string_view piece =
        std::string_view(escaped).substr(symbols[i].offset, symbols[i].length);
    const int32_t id = PieceToId(piece);
    if (id >= 0) {
      ids.push_back(id);
      continue;
    }
    for (char c : piece) {
      const int32_t byte_id = byte_to_id_[static_cast<uint8_t>(c)];
      if (byte_id >= 0) {
        ids.push_back(byte_id);
      } else if (unk_id_ >= 0) {
        ids.push_back(unk_id_);
      }
    }
  }
  return ids;
}

std::string Tokenizer::TokenToPiece(int32_t id) const {
  if (id < 0 || id >= n_vocab()) return "";
  switch (types_[id]) {
    case VocabTokenType::kControl:
    case VocabTokenType::kUnused:
      return "";
    case VocabTokenType::kUnknown:
      return std::string(kUnknownPiece);
    case VocabTokenType::kByte:
      return std::string(1, static_cast<char>(byte_values_[id]));
    case VocabTokenType::kUndefined:
    case VocabTokenType::kNormal:
    case VocabTokenType::kUserDefined:
      break;
  }
  return UnescapeSpaces(texts_[id]);
}

std::string Tokenizer::Decode(const std::vector<int32_t>& ids) const {
  std::string text;
  bool at_start = add_space_prefix_;
  for (int32_t id : ids) {
    std::string piece = TokenToPiece(id);
    if (at_start) {
      const VocabTokenType type = TokenType(id);
      if (type == VocabTokenType::kControl) continue;
      at_start = false;
      const bool textual = type == VocabTokenType::kNormal ||
                           type == VocabTokenType::kUserDefined ||
                           type == VocabTokenType::kUndefined;
      if (textual && !piece.empty() && piece[0] == ' ') piece.erase(0, 1);
    }
    text += piece;
  }
  return text;
}

bool Tokenizer::IsEndOfGeneration(int32_t id) const {
  return id >= 0 && (id == eos_id_ || id == eot_id_);
}

const std::string& Tokenizer::TokenText(int32_t id) const {
  static const std::string* const kEmpty = new std::string();
  return id >= 0 && id < n_vocab() ? texts_[id] : *kEmpty;
}

VocabTokenType Tokenizer::TokenType(int32_t id) const {
  return id >= 0 && id < n_vocab() ? types_[id] : VocabTokenType::kUndefined;
}

float Tokenizer::TokenScore(int32_t id) const {
  return id >= 0 && id < n_vocab() ? scores_[id] : 0.0f;
}

std::string StreamingDetokenizer::Push(int32_t id) {
  pending_ += tokenizer_.TokenToPiece(id);
  return Drain(/*final=*/false);
}

std::string StreamingDetokenizer::Flush() { return Drain(/*final=*/true); }

std::string StreamingDetokenizer::Drain(bool final) {
  std::string out;
  size_t pos = 0;
  while (pos < pending_.size()) {
    bool valid, incomplete;
    const size_t length = ClassifyUtf8(std::string_view(pending_).substr(pos), &valid, &incomplete);
    if (incomplete && !final) break;  // wait for the rest of the character
    if (valid) {
      out.append(pending_, pos, length);
    } else {
      out.append(kReplacementChar);
    }
    pos += length;
  }
  pending_.erase(0, pos);
  return out;
}

}  // namespace moepool
