// Grammar-constrained sampling over a vocabulary: which tokens may come next under a JsonGrammar.
//
// VocabTrie: every token with output bytes (Tokenizer::TokenToPiece not empty; the unknown token
// excluded) in a byte trie, flattened in depth-first order so that the walk is one loop.
// TokenConstraint: one sequence's matcher. Mask() walks the trie with the matcher, one byte per
// trie edge, skipping the subtree below any byte the grammar refuses, so each step costs one
// matcher step per trie node the grammar allows a prefix of; the allowed set of each distinct
// state is cached (states recur: every "next key", every string without a length bound, ...).
// End tokens (EOS, end of turn, a template's stop tokens) are allowed exactly when the text may
// end; once the text is finished (nothing may follow) only they are.
//
// Threading: a VocabTrie is immutable and shared. A TokenConstraint is not thread-safe (one per
// sequence); it borrows the trie and shares the grammar.
#ifndef MOEPOOL_COORDINATOR_TOKEN_CONSTRAINT_H_
#define MOEPOOL_COORDINATOR_TOKEN_CONSTRAINT_H_

#include <cstdint>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

#include "coordinator/json_grammar.h"
#include "engine/tokenizer.h"

namespace moepool {

class VocabTrie {
 public:
  explicit VocabTrie(const Tokenizer& tokenizer);

  struct Node {
    uint8_t byte = 0;
    uint16_t depth = 0;       // 1 for a token's first byte
    int32_t skip = 0;         // index of the first node after this subtree
    int32_t first_token = 0;  // tokens ending here: token_ids[first_token, first_token + n)
    int32_t n_tokens = 0;
  };
  const std::vector<Node>& nodes() const { return nodes_; }
  const std::vector<int32_t>& token_ids() const { return token_ids_; }
  const std::string& piece(int32_t id) const { return pieces_[static_cast<size_t>(id)]; }
  int32_t n_vocab() const { return static_cast<int32_t>(pieces_.size()); }
  int max_depth() const { return max_depth_; }

 private:
  std::vector<Node> nodes_;  // depth-first; children in byte order
  std::vector<int32_t> token_ids_;
  std::vector<std::string> pieces_;  // per token id: its bytes in the trie ("" = never allowed)
  int max_depth_ = 0;
};

class TokenConstraint {
 public:
  // `end_tokens`: the ids that end the text. Borrows `trie` (must outlive this).
  TokenConstraint(std::shared_ptr<const JsonGrammar> grammar, const VocabTrie* trie,
                  std::vector<int32_t> end_tokens);

  // Computes the first step's allowed tokens now (e.g. on the thread that submits the request).
  void Prepare() { Allowed(); }
  // Sets the logit of every token the grammar does not allow next to -infinity. False if no
  // token is allowed (the vocabulary cannot continue the text).
  bool Mask(float* logits, int64_t n_vocab);
  // Moves past a sampled token: its bytes (an end token: nothing). False if the grammar refuses
  // it (then the state is unchanged).
  bool Accept(int32_t token);
  // True when the text is complete and nothing may follow it.
  bool Finished() const { return matcher_.Finished(); }
  bool IsEndToken(int32_t token) const;

  // Counters for benchmarks and metrics.
  uint64_t masks_computed() const { return masks_computed_; }
  uint64_t masks_cached() const { return masks_cached_; }

 private:
  // The allowed token ids of the current state, as a bitset over the vocabulary.
  const std::vector<uint64_t>& Allowed();

  std::shared_ptr<const JsonGrammar> grammar_;
  const VocabTrie* trie_;
  std::vector<int32_t> end_tokens_;
  JsonMatcher matcher_;
  std::vector<MatchState> levels_;  // the walk's state after each depth
  std::unordered_map<std::string, std::vector<uint64_t>> cache_;
  uint64_t masks_computed_ = 0;
  uint64_t masks_cached_ = 0;
};

}  // namespace moepool

#endif  // MOEPOOL_COORDINATOR_TOKEN_CONSTRAINT_H_
