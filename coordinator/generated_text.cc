#include "coordinator/generated_text.h"

#include <algorithm>
#include <utility>

namespace moepool {
namespace {

// Position of the earliest occurrence of any stop string in `text`, or npos.
size_t FindStop(const std::string& text, const std::vector<std::string>& stops) {
  size_t best = std::string::npos;
  for (const std::string& s : stops) best = std::min(best, text.find(s));
  return best;
}

// Length of the longest suffix of `text` that is a proper prefix of a stop string: text that
// must be held back because the next tokens may complete a stop string. Stop strings are valid
// UTF-8, so such a suffix starts on a character boundary.
size_t StopPrefixSuffix(const std::string& text, const std::vector<std::string>& stops) {
  size_t hold = 0;
  for (const std::string& s : stops) {
    for (size_t k = std::min(s.size() - 1, text.size()); k > hold; --k) {
      if (text.compare(text.size() - k, k, s, 0, k) == 0) {
        hold = k;
        break;
      }
    }
  }
  return hold;
}

}  // namespace

GeneratedText::GeneratedText(const Tokenizer& tokenizer, std::vector<std::string> stop,
                             bool trim_leading_space)
    : detok_(tokenizer), stop_(std::move(stop)), trim_pending_(trim_leading_space) {}

GeneratedText::Delta GeneratedText::Push(int32_t id, bool final) {
  std::string piece = id >= 0 ? detok_.Push(id) : std::string();
  if (final) piece += detok_.Flush();
  if (trim_pending_ && !piece.empty()) {
    if (piece[0] == ' ') piece.erase(0, 1);
    trim_pending_ = false;
  }
  held_ += piece;
  Delta out;
  const size_t stop_at = FindStop(held_, stop_);
  if (stop_at != std::string::npos) {
    out.text = held_.substr(0, stop_at);
    held_.clear();
    out.stopped = true;
    return out;
  }
  const size_t keep = final ? 0 : StopPrefixSuffix(held_, stop_);
  out.text = held_.substr(0, held_.size() - keep);
  held_.erase(0, held_.size() - keep);
  return out;
}

}  // namespace moepool
