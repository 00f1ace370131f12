// Grammar-constrained JSON: a compiled grammar (JsonGrammar, built by json_schema.h from a JSON
// schema, or for tool calls by tool_calls.h) and a byte-level matcher over it (JsonMatcher).
// token_constraint.h lifts the matcher from bytes to vocabulary tokens.
//
// The matcher is a pushdown automaton. A state is a small set of stacks of frames, one frame per
// JSON value being written (an object waiting for its next key, a string inside its quotes, ...);
// the alternatives of an anyOf become separate stacks, which die as bytes rule them out. A byte is
// accepted when at least one stack accepts it. The language is JSON restricted as follows, so
// that every accepted text that can end is valid for its schema:
//   - whitespace only between tokens, at most kMaxGapWhitespace bytes (' ', '\n', '\t') per gap,
//     none after the top-level value;
//   - object properties in the order the grammar lists them, optional ones skippable, no others
//     (a map node allows any keys);
//   - strings: valid UTF-8, no raw control characters, escapes \" \\ \/ \b \f \n \r \t and
//     \uXXXX outside the surrogate range; lengths counted in code points;
//   - integers at most kMaxIntegerDigits digits, within the node's bounds (a prefix is accepted
//     only if some completion is inside them); numbers at most kMaxIntegerDigits integer,
//     kMaxFractionDigits fraction and kMaxExponentDigits exponent digits; no "-0".
//
// Threading: a JsonGrammar is immutable once built and may be shared by any number of matchers
// on any threads. A JsonMatcher is not thread-safe (one per sequence).
#ifndef MOEPOOL_COORDINATOR_JSON_GRAMMAR_H_
#define MOEPOOL_COORDINATOR_JSON_GRAMMAR_H_

#include <cstdint>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace moepool {

inline constexpr int kMaxGapWhitespace = 16;
inline constexpr int kMaxIntegerDigits = 15;
inline constexpr int kMaxFractionDigits = 15;
inline constexpr int kMaxExponentDigits = 2;  // e+99: every number stays a finite double
inline constexpr int kMaxMatchDepth = 96;     // open values per stack (deeper nesting is refused)
inline constexpr int kMaxMatchStacks = 64;    // alternatives alive at once (more are dropped)

struct GrammarNode {
  enum class Kind : uint8_t {
    kLiterals,  // one of a set of byte strings (enum, const, true/false, null, object keys)
    kString,    // a JSON string with min/max length
    kInteger,   // a JSON integer within [min_value, max_value]
    kNumber,    // any JSON number (bounded in length)
    kArray,     // [child, ...] with min/max items
    kObject,    // the listed properties, in order
    kMap,       // any string keys -> child
    kAnyOf,     // one of children
    kPrefixed,  // optional whitespace, `prefix`, optional whitespace, child; the root of a grammar
  };
  Kind kind = Kind::kLiterals;
  int32_t literals = -1;    // kLiterals: index into JsonGrammar::literal_sets
  int64_t min_length = 0;   // kString: code points; kArray: items
  int64_t max_length = -1;  // < 0: unbounded
  int64_t min_value = 0;    // kInteger (inclusive)
  int64_t max_value = 0;
  int32_t child = -1;  // kArray: item; kMap: value; kPrefixed: after the prefix
  int32_t key = -1;    // kMap: the key's string node
  // kAnyOf: alternatives. kObject: each property's value node.
  std::vector<int32_t> children;
  // kObject, per next-property index i in [0, n]: the literal node of the quoted keys that may
  // come next (properties i.. up to the first required one; its tag = property index), -1 when
  // none may; and whether the object may close there (no required property at >= i).
  std::vector<int32_t> key_nodes;
  std::vector<bool> closable;
  std::string prefix;  // kPrefixed
  // kPrefixed: a reply whose first non-space bytes leave the prefix is free text (any bytes).
  bool free_text_escape = false;
};

// Sorted, distinct byte strings, each with a tag (e.g. a property index).
struct LiteralSet {
  std::vector<std::string> items;
  std::vector<int32_t> tags;
};

struct JsonGrammar {
  std::vector<GrammarNode> nodes;
  std::vector<LiteralSet> literal_sets;
  int32_t root = -1;  // a kPrefixed node

  int32_t Add(GrammarNode node);
  // A kLiterals node for (text, tag) pairs (sorted and deduplicated here; the first tag of a
  // duplicate wins).
  int32_t AddLiterals(std::vector<std::pair<std::string, int32_t>> items);
};

// One open value of one stack. Plain data: states compare and hash by their bytes.
struct MatchFrame {
  int32_t node = 0;
  int32_t phase = 0;
  int64_t a = 0;  // per kind: count of characters / items, next property, range start, ...
  int64_t b = 0;
  int64_t v = 0;
  int32_t ws = 0;  // whitespace bytes in the current gap
  int32_t unused = 0;
};

// A set of stacks: stack i is frames[ends[i-1], ends[i]) (bottom first).
struct MatchState {
  std::vector<MatchFrame> frames;
  std::vector<uint32_t> ends;
};

class JsonMatcher {
 public:
  // Borrows the grammar, which must outlive the matcher.
  explicit JsonMatcher(const JsonGrammar* grammar);

  // The state before any byte.
  static MatchState Initial(const JsonGrammar& grammar);
  // `out` = `in` after byte `c`; false (out empty) if no stack accepts it. `out` must not be `in`.
  static bool Step(const JsonGrammar& grammar, const MatchState& in, uint8_t c, MatchState* out);
  // True if the text may end in this state.
  static bool CanEnd(const JsonGrammar& grammar, const MatchState& state);
  // True if every byte sequence is accepted from here (free text after a tool-call prefix).
  static bool IsFreeText(const JsonGrammar& grammar, const MatchState& state);

  // Feeds bytes; on rejection returns false and leaves the state as before the call.
  bool Advance(std::string_view bytes);
  bool CanEnd() const { return CanEnd(*grammar_, state_); }
  bool IsFreeText() const { return IsFreeText(*grammar_, state_); }
  // True if the text may end here and no byte can follow.
  bool Finished() const;
  const MatchState& state() const { return state_; }
  const JsonGrammar& grammar() const { return *grammar_; }

 private:
  const JsonGrammar* grammar_;
  MatchState state_;
  MatchState scratch_;
};

}  // namespace moepool

#endif  // MOEPOOL_COORDINATOR_JSON_GRAMMAR_H_
