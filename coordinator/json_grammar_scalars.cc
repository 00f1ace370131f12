#include "coordinator/json_grammar_scalars.h"

#include <algorithm>
#include <cstring>

namespace moepool::json_grammar_internal {
namespace {

bool IsDigit(uint8_t c) { return c >= '0' && c <= '9'; }
bool IsHex(uint8_t c) { return IsDigit(c) || (c >= 'a' && c <= 'f') || (c >= 'A' && c <= 'F'); }

int64_t Pow10(int k) {
  int64_t p = 1;
  for (int i = 0; i < k; ++i) p *= 10;
  return p;
}

// --- integers -----------------------------------------------------------------------------

// True if some integer whose decimal text starts with the digits taken so far (sign `neg`,
// magnitude `mag` of `digits` digits) lies in [lo, hi].
bool IntegerFeasible(bool neg, int64_t mag, int digits, int64_t lo, int64_t hi) {
  auto hits = [&](int64_t m_lo, int64_t m_hi) {  // magnitudes [m_lo, m_hi] with the sign
    const int64_t v_lo = neg ? -m_hi : m_lo;
    const int64_t v_hi = neg ? -m_lo : m_hi;
    return v_lo <= hi && v_hi >= lo;
  };
  if (digits == 0) {
    if (!neg && hits(0, 0)) return true;
    for (int k = 1; k <= kMaxIntegerDigits; ++k) {
      if (hits(Pow10(k - 1), Pow10(k) - 1)) return true;
    }
    return false;
  }
  if (hits(mag, mag)) return true;
  if (mag == 0) return false;  // a leading zero takes no more digits
  for (int k = 1; digits + k <= kMaxIntegerDigits; ++k) {
    const int64_t p = Pow10(k);
    if (hits(mag * p, mag * p + p - 1)) return true;
  }
  return false;
}

}  // namespace

Took TakeInteger(const GrammarNode& n, MatchFrame& f, uint8_t c) {
  const bool neg = f.b != 0;
  if (f.phase == kIntStart && c == '-') {
    if (!IntegerFeasible(true, 0, 0, n.min_value, n.max_value)) return Took::kNo;
    f.phase = kIntMinus;
    f.b = 1;
    return Took::kYes;
  }
  if (!IsDigit(c)) return Took::kNo;
  const int d = c - '0';
  if (f.phase == kIntStart || f.phase == kIntMinus) {
    if (d == 0 && neg) return Took::kNo;  // no "-0"
    if (!IntegerFeasible(neg, d, 1, n.min_value, n.max_value)) return Took::kNo;
    f.phase = d == 0 ? kIntZero : kIntDigits;
    f.v = d;
    f.a = 1;
    return Took::kYes;
  }
  if (f.phase != kIntDigits || f.a >= kMaxIntegerDigits) return Took::kNo;
  const int64_t mag = f.v * 10 + d;
  if (!IntegerFeasible(neg, mag, static_cast<int>(f.a) + 1, n.min_value, n.max_value)) {
    return Took::kNo;
  }
  f.v = mag;
  ++f.a;
  return Took::kYes;
}

bool IntegerCanEnd(const GrammarNode& n, const MatchFrame& f) {
  if (f.phase != kIntZero && f.phase != kIntDigits) return false;
  const int64_t value = f.b != 0 ? -f.v : f.v;
  return value >= n.min_value && value <= n.max_value;
}

// --- numbers ------------------------------------------------------------------------------

Took TakeNumber(MatchFrame& f, uint8_t c) {
  const bool digit = IsDigit(c);
  auto to = [&](int phase, int64_t count) {
    f.phase = phase;
    f.a = count;
    return Took::kYes;
  };
  switch (f.phase) {
    case kNumStart:
      if (c == '-') return to(kNumMinus, 0);
      [[fallthrough]];
    case kNumMinus:
      if (c == '0') return to(kNumZero, 1);
      if (digit) return to(kNumInt, 1);
      return Took::kNo;
    case kNumZero:
    case kNumInt:
      if (digit && f.phase == kNumInt && f.a < kMaxIntegerDigits) return to(kNumInt, f.a + 1);
      if (c == '.') return to(kNumDot, 0);
      if (c == 'e' || c == 'E') return to(kNumE, 0);
      return Took::kNo;
    case kNumDot:
    case kNumFrac:
      if (digit && f.a < kMaxFractionDigits) return to(kNumFrac, f.a + 1);
      if (f.phase == kNumFrac && (c == 'e' || c == 'E')) return to(kNumE, 0);
      return Took::kNo;
    case kNumE:
      if (c == '+' || c == '-') return to(kNumESign, 0);
      [[fallthrough]];
    case kNumESign:
    case kNumExp:
      if (digit && f.a < kMaxExponentDigits) return to(kNumExp, f.a + 1);
      return Took::kNo;
    default:
      return Took::kNo;
  }
}

bool NumberCanEnd(const MatchFrame& f) {
  return f.phase == kNumZero || f.phase == kNumInt || f.phase == kNumFrac || f.phase == kNumExp;
}

// --- strings ------------------------------------------------------------------------------

namespace {

// Starts a UTF-8 character at lead byte c: the continuation count and the next byte's range.
bool Utf8Lead(uint8_t c, int64_t* continuations, int64_t* range) {
  auto set = [&](int n, int lo, int hi) {
    *continuations = n;
    *range = lo | (hi << 8);
    return true;
  };
  if (c >= 0xC2 && c <= 0xDF) return set(1, 0x80, 0xBF);
  if (c == 0xE0) return set(2, 0xA0, 0xBF);
  if ((c >= 0xE1 && c <= 0xEC) || c == 0xEE || c == 0xEF) return set(2, 0x80, 0xBF);
  if (c == 0xED) return set(2, 0x80, 0x9F);  // no surrogates
  if (c == 0xF0) return set(3, 0x90, 0xBF);
  if (c >= 0xF1 && c <= 0xF3) return set(3, 0x80, 0xBF);
  if (c == 0xF4) return set(3, 0x80, 0x8F);
  return false;
}

}  // namespace

Took TakeString(const GrammarNode& n, MatchFrame& f, uint8_t c) {
  const bool room = n.max_length < 0 || f.a < n.max_length;
  switch (f.phase) {
    case kStrStart:
      if (c != '"') return Took::kNo;
      f.phase = kStrBody;
      return Took::kYes;
    case kStrBody:
      if (c == '"') {
        if (f.a < n.min_length) return Took::kNo;
        f.phase = kStrDone;
        return Took::kYes;
      }
      if (c < 0x20 || !room) return Took::kNo;
      if (c == '\\') {
        f.phase = kStrEscape;
      } else if (c >= 0x80) {
        if (!Utf8Lead(c, &f.b, &f.v)) return Took::kNo;
        f.phase = kStrUtf8;
      }
      // Without a maximum only the minimum needs counting to (equal states then compare equal).
      if (n.max_length >= 0 || f.a < n.min_length) ++f.a;
      return Took::kYes;
    case kStrEscape:
      if (c == 'u') {
        f.phase = kStrHex;
        f.b = 0;  // hex digits taken
        return Took::kYes;
      }
      if (std::strchr("\"\\/bfnrt", c) == nullptr || c == 0) return Took::kNo;
      f.phase = kStrBody;
      return Took::kYes;
    case kStrHex:
      if (!IsHex(c)) return Took::kNo;
      if (f.b == 0) f.v = (c == 'd' || c == 'D') ? 1 : 0;  // a surrogate needs 8-f next
      if (f.b == 1 && f.v == 1 && !(c >= '0' && c <= '7')) return Took::kNo;
      if (++f.b == 4) f.phase = kStrBody;
      return Took::kYes;
    case kStrUtf8:
      if (c < (f.v & 0xFF) || c > (f.v >> 8)) return Took::kNo;
      f.v = 0x80 | (0xBF << 8);
      if (--f.b == 0) f.phase = kStrBody;
      return Took::kYes;
    default:
      return Took::kNo;
  }
}

// --- literals -----------------------------------------------------------------------------

Took TakeLiteral(const LiteralSet& set, MatchFrame& f, uint8_t c) {
  const size_t pos = static_cast<size_t>(f.v);
  const char ch = static_cast<char>(c);
  // Items sharing the prefix are contiguous and sorted by their byte at `pos`.
  auto lo = set.items.begin() + f.a, hi = set.items.begin() + f.b;
  auto first = std::partition_point(lo, hi, [&](const std::string& s) {
    return s.size() <= pos || static_cast<uint8_t>(s[pos]) < c;
  });
  auto last = std::partition_point(first, hi, [&](const std::string& s) { return s[pos] == ch; });
  if (first == last) return Took::kNo;
  f.a = first - set.items.begin();
  f.b = last - set.items.begin();
  ++f.v;
  return Took::kYes;
}

bool LiteralCanEnd(const LiteralSet& set, const MatchFrame& f) {
  return f.a < f.b && set.items[static_cast<size_t>(f.a)].size() == static_cast<size_t>(f.v);
}

// The matcher's byte step over one stack at a time, appending the resulting stacks to `out`.
// Takes a whitespace byte into the frame's current gap if there is room.
Took Gap(MatchFrame& f, uint8_t c) {
  if (!IsGapSpace(c) || f.ws >= kMaxGapWhitespace) return Took::kNo;
  ++f.ws;
  return Took::kYes;
}

}  // namespace moepool::json_grammar_internal
