// SentencePiece-BPE tokenizer for GGUF vocabularies with `tokenizer.ggml.model = "llama"`
// (LLaMA, Mistral, Mixtral), reproducing llama.cpp's tokenization exactly.
//
// Encoding: spaces become U+2581 "▁", a "▁" is prepended when add_space_prefix is set, the text
// is split into UTF-8 characters, and the adjacent pair whose concatenation is a vocabulary piece
// with the highest score is merged repeatedly (ties: leftmost pair). A final symbol that is not a
// piece is emitted as byte tokens "<0xNN>" (byte fallback), or the unknown token where the
// vocabulary lacks that byte token. Control-token text such as "<s>" in the input is ordinary
// text: only `add_bos` produces BOS.
//
// Ownership: a Tokenizer copies what it needs from the GgufFile; the file may be closed after
// FromGguf returns. Threading: a Tokenizer is immutable after construction, so any number of
// threads may use one concurrently. A StreamingDetokenizer holds per-stream state and is not
// thread-safe; it references its Tokenizer, which must outlive it.
#ifndef MOEPOOL_ENGINE_TOKENIZER_H_
#define MOEPOOL_ENGINE_TOKENIZER_H_

#include <array>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/gguf.h"

namespace moepool {

// Values of `tokenizer.ggml.token_type`.
enum class VocabTokenType : int32_t {
  kUndefined = 0,
  kNormal = 1,
  kUnknown = 2,
  kControl = 3,
  kUserDefined = 4,
  kUnused = 5,
  kByte = 6,
};

class Tokenizer {
 public:
  // Reads the vocabulary from a GGUF file's metadata. Returns INVALID_ARGUMENT naming the file
  // and key when metadata is missing or inconsistent: tokenizer model absent or not "llama", no
  // tokens, scores or token types count != tokens count, unknown token type, a byte token whose
  // text is not "<0xNN>", or a special token id out of range.
  // Optional keys and their defaults: scores (all 0), token types (all normal),
  // bos_token_id 1, eos_token_id 2, unknown_token_id 0 (each only if inside the vocabulary),
  // eot_token_id none, add_bos_token true, add_eos_token false, add_space_prefix true.
  static absl::StatusOr<std::unique_ptr<Tokenizer>> FromGguf(const GgufFile& file);

  // Text -> ids. The text may be any bytes (invalid UTF-8 falls back to byte tokens). Empty text
  // gives no tokens besides the optional BOS. Callers normally pass add_bos_default(). Encode
  // never appends EOS; callers that want it check add_eos_default().
  std::vector<int32_t> Encode(std::string_view text, bool add_bos) const;

  // The bytes a token stands for in output: "▁" becomes ' ' in normal and user-defined tokens,
  // byte tokens "<0xNN>" give that byte, control and unused tokens give "", the unknown token
  // gives U+2585 "▅" (as llama.cpp does), an id outside the vocabulary gives "".
  std::string TokenToPiece(int32_t id) const;

  // Decodes a whole sequence: the concatenation of TokenToPiece over `ids`, except that when
  // add_space_prefix is set, the single space that Encode's prefix produced is removed. The rule:
  // leading control tokens (BOS and the like) are skipped; if the first remaining token is a
  // normal or user-defined token whose piece starts with ' ', that one space is dropped. Hence
  // Decode(Encode(s, b)) == s for text without a literal U+2581 (which decodes as a space).
  std::string Decode(const std::vector<int32_t>& ids) const;

  int32_t bos_id() const { return bos_id_; }  // -1 if the vocabulary has none
  int32_t eos_id() const { return eos_id_; }  // -1 if the vocabulary has none
  int32_t unk_id() const { return unk_id_; }  // -1 if the vocabulary has none
  int32_t n_vocab() const { return static_cast<int32_t>(texts_.size()); }
  bool add_bos_default() const { return add_bos_; }
  bool add_eos_default() const { return add_eos_; }
  bool add_space_prefix() const { return add_space_prefix_; }

  // True for EOS and, if the vocabulary names one, the end-of-turn token.
  bool IsEndOfGeneration(int32_t id) const;
  // The vocabulary text of a token ("▁Hello", "<0x0A>", "<s>"); "" for an id out of range.
  const std::string& TokenText(int32_t id) const;
  VocabTokenType TokenType(int32_t id) const;
  float TokenScore(int32_t id) const;
  // Id of the vocabulary piece with exactly this text, or -1.
  int32_t PieceToId(std::string_view piece) const;

 private:
  struct PieceHash {
    using is_transparent = void;
    size_t operator()(std::string_view s) const { return std::hash<std::string_view>{}(s); }
  };

  Tokenizer() = default;

  std::vector<std::string> texts_;
  std::vector<float> scores_;
  std::vector<VocabTokenType> types_;
  std::vector<int16_t> byte_values_;  // per token: the byte of a byte token, else -1
  std::unordered_map<std::string, int32_t, PieceHash, std::equal_to<>> piece_to_id_;
  std::array<int32_t, 256> byte_to_id_{};  // id of "<0xNN>" or -1
  int32_t bos_id_ = -1;
  int32_t eos_id_ = -1;
  int32_t unk_id_ = -1;
  int32_t eot_id_ = -1;
  bool add_bos_ = true;
  bool add_eos_ = false;
  bool add_space_prefix_ = true;
};

// Turns generated tokens into text incrementally. Push returns only complete, valid UTF-8: the
// bytes of a character whose remaining byte tokens have not arrived are held back. Bytes that
// cannot start or continue a valid character become U+FFFD (one per maximal invalid sequence, as
// in the WHATWG decoder). Flush returns what is held back, an incomplete character becoming
// U+FFFD, and resets the stream. Pieces are TokenToPiece's (no leading-space removal: this is
// meant for the continuation after a prompt).
class StreamingDetokenizer {
 public:
  explicit StreamingDetokenizer(const Tokenizer& tokenizer) : tokenizer_(tokenizer) {}

  std::string Push(int32_t id);
  std::string Flush();

 private:
  // Moves the decodable prefix of pending_ to the result; with `final`, everything.
  std::string Drain(bool final);

  const Tokenizer& tokenizer_;
  std::string pending_;
};

}  // namespace moepool

#endif  // MOEPOOL_ENGINE_TOKENIZER_H_
