// The text of one sequence's generated tokens as it may be streamed: detokenized so that every
// delta is valid UTF-8 (StreamingDetokenizer), the leading space of the first piece dropped when
// asked, and stop strings applied: text that may be the start of a stop string is held back until
// it cannot be, and a stop string ends the text without being sent.
//
// Thread-compatible; one per sequence, on the scheduler's thread.
#ifndef MOEPOOL_COORDINATOR_GENERATED_TEXT_H_
#define MOEPOOL_COORDINATOR_GENERATED_TEXT_H_

#include <cstdint>
#include <string>
#include <vector>

#include "engine/tokenizer.h"

namespace moepool {

class GeneratedText {
 public:
  // Borrows the tokenizer, which must outlive this.
  GeneratedText(const Tokenizer& tokenizer, std::vector<std::string> stop, bool trim_leading_space);

  struct Delta {
    std::string text;      // to send now (possibly empty)
    bool stopped = false;  // a stop string was found: the text ends here
  };
  // Adds token `id` (< 0: none, e.g. an end-of-turn token) and, with `final`, flushes what is
  // held back (an incomplete character becomes U+FFFD).
  Delta Push(int32_t id, bool final);

 private:
  StreamingDetokenizer detok_;
  std::vector<std::string> stop_;
  bool trim_pending_;
  std::string held_;  // decoded text not yet sent (a possible stop-string prefix)
};

}  // namespace moepool

#endif  // MOEPOOL_COORDINATOR_GENERATED_TEXT_H_
