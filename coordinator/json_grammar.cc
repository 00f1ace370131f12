#include "coordinator/json_grammar.h"

#include <algorithm>
#include <cstddef>
#include <cstring>

#include "coordinator/json_grammar_scalars.h"

namespace moepool {
namespace {

using Kind = GrammarNode::Kind;
using namespace json_grammar_internal;  // NOLINT: the frame kinds of one grammar

class Stepper {
 public:
  Stepper(const JsonGrammar& g, MatchState* out) : g_(g), out_(out) {}

  // Feeds c to the stack frames[start, end): the top frame takes it, and, if the top frame may
  // end, its parent also gets the chance (two stacks may result).
  void Feed(size_t start, uint8_t c) {
    std::vector<MatchFrame>& fr = out_->frames;
    const size_t top = fr.size() - 1;
    const bool pass_up = top > start && CanEndFrame(fr[top]);
    std::vector<MatchFrame> saved;
    if (pass_up) saved.assign(fr.begin() + static_cast<std::ptrdiff_t>(start), fr.end());
    int32_t child = -1;
    switch (Take(fr[top], c, &child)) {
      case Took::kNo:
        fr.resize(start);
        break;
      case Took::kYes:
        Commit(start);
        break;
      case Took::kPush:
        Open(start, child, c);
        break;
    }
    if (pass_up) {
      const size_t s2 = fr.size();
      fr.insert(fr.end(), saved.begin(), saved.end());
      const MatchFrame done = fr.back();
      fr.pop_back();
      ChildDone(fr.back(), done);
      Feed(s2, c);
    }
  }

  bool CanEndFrame(const MatchFrame& f) const {
    const GrammarNode& n = g_.nodes[static_cast<size_t>(f.node)];
    switch (n.kind) {
      case Kind::kLiterals:
        return LiteralCanEnd(g_.literal_sets[static_cast<size_t>(n.literals)], f);
      case Kind::kString:
        return f.phase == kStrDone;
      case Kind::kInteger:
        return IntegerCanEnd(n, f);
      case Kind::kNumber:
        return NumberCanEnd(f);
      case Kind::kArray:
        return f.phase == kArrDone;
      case Kind::kObject:
      case Kind::kMap:
        return f.phase == kObjDone;
      case Kind::kPrefixed:
        return f.phase == kPreDone || f.phase == kPreFree ||
               (f.phase == kPreText && n.free_text_escape);
      case Kind::kAnyOf:
        break;
    }
    return false;
  }

  // The parent `f` learns that its child `child` is complete.
  void ChildDone(MatchFrame& f, const MatchFrame& child) const {
    const GrammarNode& n = g_.nodes[static_cast<size_t>(f.node)];
    f.ws = 0;
    switch (n.kind) {
      case Kind::kArray:
        if (n.max_length >= 0 || f.a < n.min_length) ++f.a;  // as strings count characters
        f.phase = kArrAfterItem;
        break;
      case Kind::kObject:
      case Kind::kMap:
        if (f.phase == kObjKey) {
          if (n.kind == Kind::kObject) {
            const GrammarNode& key = g_.nodes[static_cast<size_t>(child.node)];
            const LiteralSet& set = g_.literal_sets[static_cast<size_t>(key.literals)];
            f.b = set.tags[static_cast<size_t>(child.a)];
            f.a = f.b + 1;
          }
          f.phase = kObjAfterKey;
        } else {
          f.phase = kObjAfterValue;
        }
        break;
      case Kind::kPrefixed:
        f.phase = kPreDone;
        break;
      default:
        break;
    }
  }

 private:
  // Complete frames that can take nothing more are closed into their parents, then the stack
  // is kept unless it duplicates one already kept.
  void Commit(size_t start) {
    std::vector<MatchFrame>& fr = out_->frames;
    while (fr.size() - start > 1 && Done(fr.back())) {
      const MatchFrame done = fr.back();
      fr.pop_back();
      ChildDone(fr.back(), done);
    }
    const size_t len = fr.size() - start;
    size_t prev = 0;
    for (uint32_t end : out_->ends) {
      if (end - prev == len && std::memcmp(&fr[prev], &fr[start], len * sizeof(MatchFrame)) == 0) {
        fr.resize(start);
        return;
      }
      prev = end;
    }
    if (out_->ends.size() >= kMaxMatchStacks) {
      fr.resize(start);
      return;
    }
    out_->ends.push_back(static_cast<uint32_t>(fr.size()));
  }

  // Pushes a frame for `node` (each alternative of an anyOf on a copy of the stack) and feeds
  // it c.
  void Open(size_t start, int32_t node, uint8_t c) {
    std::vector<MatchFrame>& fr = out_->frames;
    const GrammarNode& n = g_.nodes[static_cast<size_t>(node)];
    if (n.kind == Kind::kAnyOf) {
      const std::vector<MatchFrame> saved(fr.begin() + static_cast<std::ptrdiff_t>(start),
                                          fr.end());
      for (size_t i = 0; i < n.children.size(); ++i) {
        size_t s = start;
        if (i > 0) {
          s = fr.size();
          fr.insert(fr.end(), saved.begin(), saved.end());
        }
        Open(s, n.children[i], c);
      }
      return;
    }
    if (fr.size() - start >= kMaxMatchDepth) {
      fr.resize(start);
      return;
    }
    MatchFrame f;
    f.node = node;
    if (n.kind == Kind::kLiterals) {
      f.b = static_cast<int64_t>(g_.literal_sets[static_cast<size_t>(n.literals)].items.size());
    }
    fr.push_back(f);
    Feed(start, c);
  }

  // True if the frame is complete and can take no byte.
  bool Done(const MatchFrame& f) const {
    const GrammarNode& n = g_.nodes[static_cast<size_t>(f.node)];
    switch (n.kind) {
      case Kind::kLiterals:
        return f.b - f.a == 1 && LiteralCanEnd(g_.literal_sets[static_cast<size_t>(n.literals)], f);
      case Kind::kString:
        return f.phase == kStrDone;
      case Kind::kInteger:
        return f.phase == kIntZero ||
               (f.phase == kIntDigits && f.a == kMaxIntegerDigits && IntegerCanEnd(n, f));
      case Kind::kArray:
        return f.phase == kArrDone;
      case Kind::kObject:
      case Kind::kMap:
        return f.phase == kObjDone;
      default:
        return false;
    }
  }

  Took Take(MatchFrame& f, uint8_t c, int32_t* child) const {
    const GrammarNode& n = g_.nodes[static_cast<size_t>(f.node)];
    switch (n.kind) {
      case Kind::kLiterals:
        return TakeLiteral(g_.literal_sets[static_cast<size_t>(n.literals)], f, c);
      case Kind::kString:
        return TakeString(n, f, c);
      case Kind::kInteger:
        return TakeInteger(n, f, c);
      case Kind::kNumber:
        return TakeNumber(f, c);
      case Kind::kArray:
        return TakeArray(n, f, c, child);
      case Kind::kObject:
      case Kind::kMap:
        return TakeObject(n, f, c, child);
      case Kind::kPrefixed:
        return TakePrefixed(n, f, c, child);
      case Kind::kAnyOf:
        break;
    }
    return Took::kNo;
  }

  static Took Push(MatchFrame& f, int phase, int32_t node, int32_t* child) {
    f.phase = phase;
    f.ws = 0;
    *child = node;
    return Took::kPush;
  }
  static Took To(MatchFrame& f, int phase) {
    f.phase = phase;
    f.ws = 0;
    return Took::kYes;
  }

  Took TakeArray(const GrammarNode& n, MatchFrame& f, uint8_t c, int32_t* child) const {
    const bool more = n.max_length < 0 || f.a < n.max_length;
    switch (f.phase) {
      case kArrStart:
        return c == '[' ? To(f, kArrOpen) : Took::kNo;
      case kArrOpen:
        if (IsGapSpace(c)) return Gap(f, c);
        if (c == ']') return n.min_length == 0 ? To(f, kArrDone) : Took::kNo;
        return more ? Push(f, kArrItem, n.child, child) : Took::kNo;
      case kArrAfterItem:
        if (IsGapSpace(c)) return Gap(f, c);
        if (c == ',') return more ? To(f, kArrComma) : Took::kNo;
        if (c == ']') return f.a >= n.min_length ? To(f, kArrDone) : Took::kNo;
        return Took::kNo;
      case kArrComma:
        if (IsGapSpace(c)) return Gap(f, c);
        return Push(f, kArrItem, n.child, child);
      default:
        return Took::kNo;
    }
  }

  Took TakeObject(const GrammarNode& n, MatchFrame& f, uint8_t c, int32_t* child) const {
    const bool map = n.kind == Kind::kMap;
    const size_t next = static_cast<size_t>(f.a);
    const int32_t key = map ? n.key : n.key_nodes[next];
    const bool closable = map || n.closable[next];
    switch (f.phase) {
      case kObjStart:
        return c == '{' ? To(f, kObjOpen) : Took::kNo;
      case kObjOpen:
      case kObjAfterValue:
      case kObjComma:
        if (IsGapSpace(c)) return Gap(f, c);
        if (c == '"' && f.phase != kObjAfterValue && key >= 0) {
          return Push(f, kObjKey, key, child);
        }
        if (c == ',' && f.phase == kObjAfterValue && key >= 0) return To(f, kObjComma);
        if (c == '}' && f.phase != kObjComma && closable) return To(f, kObjDone);
        return Took::kNo;
      case kObjAfterKey:
        if (IsGapSpace(c)) return Gap(f, c);
        return c == ':' ? To(f, kObjColon) : Took::kNo;
      case kObjColon:
        if (IsGapSpace(c)) return Gap(f, c);
        return Push(f, kObjValue, map ? n.child : n.children[static_cast<size_t>(f.b)], child);
      default:
        return Took::kNo;
    }
  }

  Took TakePrefixed(const GrammarNode& n, MatchFrame& f, uint8_t c, int32_t* child) const {
    switch (f.phase) {
      case kPreText:
        if (f.v == 0 && IsGapSpace(c) && Gap(f, c) == Took::kYes) return Took::kYes;
        if (f.v < static_cast<int64_t>(n.prefix.size()) &&
            c == static_cast<uint8_t>(n.prefix[static_cast<size_t>(f.v)])) {
          if (++f.v == static_cast<int64_t>(n.prefix.size())) return To(f, kPreGap);
          return Took::kYes;
        }
        return n.free_text_escape ? To(f, kPreFree) : Took::kNo;
      case kPreGap:
        if (IsGapSpace(c)) return Gap(f, c);
        return Push(f, kPreChild, n.child, child);
      case kPreFree:
        return Took::kYes;
      default:
        return Took::kNo;
    }
  }

  const JsonGrammar& g_;
  MatchState* out_;
};

}  // namespace

int32_t JsonGrammar::Add(GrammarNode node) {
  nodes.push_back(std::move(node));
  return static_cast<int32_t>(nodes.size() - 1);
}

int32_t JsonGrammar::AddLiterals(std::vector<std::pair<std::string, int32_t>> items) {
  std::stable_sort(items.begin(), items.end(),
                   [](const auto& x, const auto& y) { return x.first < y.first; });
  LiteralSet set;
  for (auto& [text, tag] : items) {
    if (!set.items.empty() && set.items.back() == text) continue;
    set.items.push_back(std::move(text));
    set.tags.push_back(tag);
  }
  literal_sets.push_back(std::move(set));
  GrammarNode n;
  n.kind = Kind::kLiterals;
  n.literals = static_cast<int32_t>(literal_sets.size() - 1);
  return Add(std::move(n));
}

JsonMatcher::JsonMatcher(const JsonGrammar* grammar)
    : grammar_(grammar), state_(Initial(*grammar)) {}

MatchState JsonMatcher::Initial(const JsonGrammar& grammar) {
  MatchState s;
  MatchFrame root;
  root.node = grammar.root;
  if (grammar.nodes[static_cast<size_t>(grammar.root)].prefix.empty()) root.phase = kPreGap;
  s.frames.push_back(root);
  s.ends.push_back(1);
  return s;
}

bool JsonMatcher::Step(const JsonGrammar& grammar, const MatchState& in, uint8_t c,
                       MatchState* out) {
  out->frames.clear();
  out->ends.clear();
  Stepper stepper(grammar, out);
  uint32_t begin = 0;
  for (uint32_t end : in.ends) {
    const size_t start = out->frames.size();
    out->frames.insert(out->frames.end(), in.frames.begin() + begin, in.frames.begin() + end);
    stepper.Feed(start, c);
    begin = end;
  }
  return !out->ends.empty();
}

bool JsonMatcher::CanEnd(const JsonGrammar& grammar, const MatchState& state) {
  MatchState scratch;
  Stepper stepper(grammar, &scratch);
  uint32_t begin = 0;
  for (uint32_t end : state.ends) {
    std::vector<MatchFrame> st(state.frames.begin() + begin, state.frames.begin() + end);
    begin = end;
    // Close frames while they may end; the text may end if the root may.
    while (stepper.CanEndFrame(st.back())) {
      if (st.size() == 1) return true;
      const MatchFrame done = st.back();
      st.pop_back();
      stepper.ChildDone(st.back(), done);
    }
  }
  return false;
}

bool JsonMatcher::IsFreeText(const JsonGrammar& grammar, const MatchState& state) {
  uint32_t begin = 0;
  for (uint32_t end : state.ends) {
    const MatchFrame& bottom = state.frames[begin];
    if (end - begin == 1 && bottom.phase == kPreFree &&
        grammar.nodes[static_cast<size_t>(bottom.node)].kind == Kind::kPrefixed) {
      return true;
    }
    begin = end;
  }
  return false;
}

bool JsonMatcher::Advance(std::string_view bytes) {
  MatchState backup = state_;
  for (char ch : bytes) {
    if (!Step(*grammar_, state_, static_cast<uint8_t>(ch), &scratch_)) {
      state_ = std::move(backup);
      return false;
    }
    std::swap(state_, scratch_);
  }
  return true;
}

bool JsonMatcher::Finished() const {
  if (!CanEnd()) return false;
  MatchState out;
  for (int c = 0; c < 256; ++c) {
    if (Step(*grammar_, state_, static_cast<uint8_t>(c), &out)) return false;
  }
  return true;
}

}  // namespace moepool
