#include "coordinator/chat_template.h"

#include <utility>

#include "absl/strings/str_cat.h"
#include "engine/status_macros.h"

namespace moepool {
namespace {

constexpr char kImStart[] = "<|im_start|>";
constexpr char kImEnd[] = "<|im_end|>";

bool IsSystemRole(const std::string& role) { return role == "system" || role == "developer"; }

absl::Status UnknownRole(size_t i, const std::string& role) {
  return absl::InvalidArgumentError(
      absl::StrCat("messages[", i, "].role: unknown role '", role,
                   "' (expected system, developer, user, assistant or tool)"));
}

}  // namespace

absl::StatusOr<ChatFormat> ChatFormatByName(std::string_view name) {
  if (name == "mistral") return ChatFormat::kMistral;
  if (name == "chatml") return ChatFormat::kChatml;
  return absl::InvalidArgumentError(
      absl::StrCat("unknown chat template '", std::string(name), "' (expected mistral or chatml)"));
}

const char* ChatFormatName(ChatFormat format) {
  return format == ChatFormat::kMistral ? "mistral" : "chatml";
}

absl::StatusOr<ChatFormat> RecognizeChatTemplate(std::string_view jinja) {
  auto has = [&](std::string_view s) { return jinja.find(s) != std::string_view::npos; };
  if (has(kImStart) && has(kImEnd)) return ChatFormat::kChatml;
  if (has("[INST]") && has("[/INST]")) return ChatFormat::kMistral;
  return absl::InvalidArgumentError(
      "the model's tokenizer.chat_template is not a format moepool knows (mistral [INST] or "
      "chatml <|im_start|>); pass --chat-template mistral|chatml to choose one");
}

ChatTemplate::ChatTemplate(ChatFormat format, const Tokenizer* tokenizer)
    : format_(format), tokenizer_(tokenizer) {
  if (format_ == ChatFormat::kChatml) {
    const auto special = [&](const char* text) {
      const int32_t id = tokenizer_->PieceToId(text);
      const VocabTokenType t = tokenizer_->TokenType(id);
      return id >= 0 && (t == VocabTokenType::kControl || t == VocabTokenType::kUserDefined) ? id
                                                                                             : -1;
    };
    im_start_ = special(kImStart);
    im_end_ = special(kImEnd);
    if (im_start_ < 0 || im_end_ < 0) {
      im_start_ = im_end_ = -1;  // both as text, so the model sees a consistent format
      stop_strings_.push_back(kImEnd);
    } else {
      stop_tokens_.push_back(im_end_);
    }
  }
}

absl::StatusOr<ChatTemplate> ChatTemplate::ForModel(const GgufFile& file,
                                                    const Tokenizer* tokenizer,
                                                    std::string_view override_name,
                                                    std::string* notice) {
  if (!override_name.empty()) {
    ASSIGN_OR_RETURN(ChatFormat f, ChatFormatByName(override_name));
    return ChatTemplate(f, tokenizer);
  }
  absl::StatusOr<std::string> jinja = file.GetString("tokenizer.chat_template");
  if (!jinja.ok()) {
    if (notice != nullptr) {
      *notice = absl::StrCat(file.path(),
                             " has no tokenizer.chat_template; using the mistral chat format");
    }
    return ChatTemplate(ChatFormat::kMistral, tokenizer);
  }
  absl::StatusOr<ChatFormat> f = RecognizeChatTemplate(*jinja);
  if (!f.ok()) {
    return absl::InvalidArgumentError(absl::StrCat(file.path(), ": ", f.status().message()));
  }
  return ChatTemplate(*f, tokenizer);
}

bool ChatTemplate::trims_leading_space() const {
  return format_ == ChatFormat::kMistral && tokenizer_->add_space_prefix();
}

absl::StatusOr<std::vector<ChatTemplate::Piece>> ChatTemplate::MistralPieces(
    const std::vector<ChatMessage>& messages) const {
  std::vector<Piece> out;
  if (tokenizer_->bos_id() >= 0) out.push_back({tokenizer_->bos_id(), ""});
  size_t first = 0;
  std::string system;
  if (IsSystemRole(messages[0].role)) {
    system = messages[0].content;
    first = 1;
  }
  if (first == messages.size()) {
    return absl::InvalidArgumentError("messages: a user message must follow the system message");
  }
  std::string prev;  // the previous message's role ("" before the first)
  for (size_t i = first; i < messages.size(); ++i) {
    const ChatMessage& m = messages[i];
    if (m.role != "user" && m.role != "assistant" && m.role != "tool") {
      if (IsSystemRole(m.role)) {
        return absl::InvalidArgumentError(absl::StrCat(
            "messages[", i, "]: a system message is only allowed as the first message"));
      }
      return UnknownRole(i, m.role);
    }
    // user, assistant, user, ...; tool results follow an assistant's call and precede the next
    // assistant (or user) message.
    const bool ok = m.role == "user"        ? prev != "user"
                    : m.role == "assistant" ? prev == "user" || prev == "tool"
                                            : prev == "assistant" || prev == "tool";
    if (!ok) {
      return absl::InvalidArgumentError(
          absl::StrCat("messages[", i,
                       "]: conversation roles must alternate user/assistant/user/assistant/... "
                       "starting with user (tool messages follow an assistant message)"));
    }
    if (m.role == "user") {
      std::string text = "[INST] ";
      if (i == first && first == 1) absl::StrAppend(&text, system, "\n\n");
      absl::StrAppend(&text, m.content, " [/INST]");
      out.push_back({-1, std::move(text)});
    } else if (m.role == "assistant") {
      if (out.back().token >= 0) out.push_back({-1, ""});
      out.back().text += " " + m.content;
      out.push_back({tokenizer_->eos_id(), ""});
    } else {
      out.push_back({-1, m.content});
    }
    prev = m.role;
  }
  if (prev != "user" && prev != "tool") {
    return absl::InvalidArgumentError(
        "messages: the last message must be from the user (or a tool result)");
  }
  return out;
}

absl::StatusOr<std::vector<ChatTemplate::Piece>> ChatTemplate::ChatmlPieces(
    const std::vector<ChatMessage>& messages) const {
  std::vector<Piece> out;
  const auto special = [&](int32_t id, const char* text) {
    if (id >= 0) {
      out.push_back({id, ""});
    } else if (!out.empty() && out.back().token < 0) {
      out.back().text += text;
    } else {
      out.push_back({-1, text});
    }
  };
  const auto text = [&](const std::string& s) {
    if (!out.empty() && out.back().token < 0) {
      out.back().text += s;
    } else {
      out.push_back({-1, s});
    }
  };
  if (tokenizer_->add_bos_default() && tokenizer_->bos_id() >= 0) {
    out.push_back({tokenizer_->bos_id(), ""});
  }
  for (size_t i = 0; i < messages.size(); ++i) {
    const ChatMessage& m = messages[i];
    std::string role = m.role == "developer" ? "system" : m.role;
    if (role != "system" && role != "user" && role != "assistant" && role != "tool") {
      return UnknownRole(i, m.role);
    }
    special(im_start_, kImStart);
    text(role + "\n" + m.content);
    special(im_end_, kImEnd);
    text("\n");
  }
  special(im_start_, kImStart);
  text("assistant\n");
  return out;
}

absl::StatusOr<std::vector<ChatTemplate::Piece>> ChatTemplate::Pieces(
    const std::vector<ChatMessage>& messages) const {
  if (messages.empty()) return absl::InvalidArgumentError("messages: at least one is required");
  return format_ == ChatFormat::kMistral ? MistralPieces(messages) : ChatmlPieces(messages);
}

absl::StatusOr<std::vector<int32_t>> ChatTemplate::Apply(
    const std::vector<ChatMessage>& messages) const {
  ASSIGN_OR_RETURN(std::vector<Piece> pieces, Pieces(messages));
  std::vector<int32_t> ids;
  for (const Piece& p : pieces) {
    if (p.token >= 0) {
      ids.push_back(p.token);
    } else {
      const std::vector<int32_t> t = tokenizer_->Encode(p.text, /*add_bos=*/false);
      ids.insert(ids.end(), t.begin(), t.end());
    }
  }
  return ids;
}

absl::StatusOr<std::string> ChatTemplate::Render(const std::vector<ChatMessage>& messages) const {
  ASSIGN_OR_RETURN(std::vector<Piece> pieces, Pieces(messages));
  std::string out;
  for (const Piece& p : pieces) out += p.token >= 0 ? tokenizer_->TokenText(p.token) : p.text;
  return out;
}

}  // namespace moepool
