// Chat templates: turns an OpenAI-style message list into the prompt token ids a chat model was
// trained on. Two formats are built in, recognised from the GGUF's `tokenizer.chat_template`
// (a Jinja text that is not executed here) or chosen by name:
//
//   mistral  <s>[INST] {user} [/INST] {assistant}</s>[INST] {user} [/INST]
//            (Mixtral-Instruct). A leading system message is folded into the first user turn as
//            "{system}\n\n{user}"; after it, roles must alternate user/assistant starting and
//            ending with user. Tool messages follow an assistant message (its call) and are
//            written as they are, after its </s>; the conversation may end with them.
//   chatml   <|im_start|>{role}\n{content}<|im_end|>\n ... <|im_start|>assistant\n
//            Any order of system/user/assistant/tool messages. When the vocabulary lacks the
//            <|im_start|>/<|im_end|> tokens the markers are plain text and "<|im_end|>" becomes a
//            stop string.
//
// Special tokens (BOS, EOS, <|im_start|>, <|im_end|>) are inserted as token ids; message text is
// always tokenized as text, so a user cannot inject control tokens by writing "</s>". Each text
// fragment between special tokens is encoded on its own, with the tokenizer's space prefix (as
// llama.cpp tokenizes a rendered template).
//
// Threading: a ChatTemplate is immutable; Apply may be called from any number of threads. It
// borrows the Tokenizer, which must outlive it.
#ifndef MOEPOOL_COORDINATOR_CHAT_TEMPLATE_H_
#define MOEPOOL_COORDINATOR_CHAT_TEMPLATE_H_

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/gguf.h"
#include "engine/tokenizer.h"

namespace moepool {

struct ChatMessage {
  // "system", "developer" (treated as system), "user", "assistant", "tool" (a tool result,
  // already written as text by tool_calls.h)
  std::string role;
  std::string content;
};

enum class ChatFormat { kMistral, kChatml };

// "mistral" | "chatml" -> format; INVALID_ARGUMENT otherwise.
absl::StatusOr<ChatFormat> ChatFormatByName(std::string_view name);
const char* ChatFormatName(ChatFormat format);

// Recognises a GGUF `tokenizer.chat_template` text. INVALID_ARGUMENT if it is neither format.
absl::StatusOr<ChatFormat> RecognizeChatTemplate(std::string_view jinja);

class ChatTemplate {
 public:
  ChatTemplate(ChatFormat format, const Tokenizer* tokenizer);

  // The template for a model: `override_name` if not empty, else the one recognised from the
  // file's `tokenizer.chat_template`, else (no template in the file) mistral, with `*notice`
  // set to a line saying so (the caller logs it once). INVALID_ARGUMENT for an unknown override
  // name or an unrecognised template text (a startup error).
  static absl::StatusOr<ChatTemplate> ForModel(const GgufFile& file, const Tokenizer* tokenizer,
                                               std::string_view override_name, std::string* notice);

  ChatFormat format() const { return format_; }

  // Prompt token ids for `messages`, ending with the opening of the assistant's turn.
  // INVALID_ARGUMENT (naming the rule) for an empty list, an unknown role, or an order the
  // format does not allow.
  absl::StatusOr<std::vector<int32_t>> Apply(const std::vector<ChatMessage>& messages) const;

  // The same conversation as text, special tokens written as their vocabulary text ("<s>").
  // For logs and tests; never tokenize this (it would parse special tokens from user text).
  absl::StatusOr<std::string> Render(const std::vector<ChatMessage>& messages) const;

  // Tokens that end the assistant's turn besides the tokenizer's end of generation.
  const std::vector<int32_t>& stop_tokens() const { return stop_tokens_; }
  // Strings that end the assistant's turn (chatml without its special tokens).
  const std::vector<std::string>& stop_strings() const { return stop_strings_; }
  // True when the reply's first token carries a word-separating space that is not part of the
  // answer (mistral with a space-prefix vocabulary): the server drops that one space.
  bool trims_leading_space() const;

 private:
  // A rendered conversation: special token ids (text empty) and text fragments, in order.
  struct Piece {
    int32_t token = -1;
    std::string text;
  };
  absl::StatusOr<std::vector<Piece>> Pieces(const std::vector<ChatMessage>& messages) const;
  absl::StatusOr<std::vector<Piece>> MistralPieces(const std::vector<ChatMessage>& messages) const;
  absl::StatusOr<std::vector<Piece>> ChatmlPieces(const std::vector<ChatMessage>& messages) const;

  ChatFormat format_;
  const Tokenizer* tokenizer_;
  int32_t im_start_ = -1;
  int32_t im_end_ = -1;
  std::vector<int32_t> stop_tokens_;
  std::vector<std::string> stop_strings_;
};

}  // namespace moepool

#endif  // MOEPOOL_COORDINATOR_CHAT_TEMPLATE_H_
