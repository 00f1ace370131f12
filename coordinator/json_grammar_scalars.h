// Internal to json_grammar.cc: the frames of scalar values (integers, numbers, strings,
// literal sets) taking one byte each, and the phases of every kind of frame.
#ifndef MOEPOOL_COORDINATOR_JSON_GRAMMAR_SCALARS_H_
#define MOEPOOL_COORDINATOR_JSON_GRAMMAR_SCALARS_H_

#include <cstdint>

#include "coordinator/json_grammar.h"

namespace moepool::json_grammar_internal {

// What a frame did with a byte.
enum class Took { kNo, kYes, kPush };

// Phases of each kind. 0 is always "nothing taken yet".
enum StringPhase { kStrStart, kStrBody, kStrEscape, kStrHex, kStrUtf8, kStrDone };
enum IntPhase { kIntStart, kIntMinus, kIntZero, kIntDigits };
enum NumPhase {
  kNumStart,
  kNumMinus,
  kNumZero,
  kNumInt,
  kNumDot,
  kNumFrac,
  kNumE,
  kNumESign,
  kNumExp
};
enum ArrayPhase { kArrStart, kArrOpen, kArrAfterItem, kArrComma, kArrItem, kArrDone };
enum ObjectPhase {
  kObjStart,
  kObjOpen,
  kObjKey,
  kObjAfterKey,
  kObjColon,
  kObjValue,
  kObjAfterValue,
  kObjComma,
  kObjDone
};
enum PrefixPhase { kPreText, kPreGap, kPreChild, kPreDone, kPreFree };

// Whitespace between tokens.
inline bool IsGapSpace(uint8_t c) { return c == ' ' || c == '\n' || c == '\t'; }

// Takes a whitespace byte into the frame's current gap if there is room.
Took Gap(MatchFrame& f, uint8_t c);

// Each kind's byte step (kNo leaves the frame unchanged) and whether it may end here.
Took TakeInteger(const GrammarNode& n, MatchFrame& f, uint8_t c);
bool IntegerCanEnd(const GrammarNode& n, const MatchFrame& f);
Took TakeNumber(MatchFrame& f, uint8_t c);
bool NumberCanEnd(const MatchFrame& f);
Took TakeString(const GrammarNode& n, MatchFrame& f, uint8_t c);
Took TakeLiteral(const LiteralSet& set, MatchFrame& f, uint8_t c);
bool LiteralCanEnd(const LiteralSet& set, const MatchFrame& f);

}  // namespace moepool::json_grammar_internal

#endif  // MOEPOOL_COORDINATOR_JSON_GRAMMAR_SCALARS_H_
