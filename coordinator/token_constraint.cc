#include "coordinator/token_constraint.h"

#include <algorithm>
#include <cmath>
#include <utility>

namespace moepool {
namespace {

constexpr size_t kMaxCachedStates = 4096;

std::string StateKey(const MatchState& s) {
  std::string key(reinterpret_cast<const char*>(s.frames.data()),
                  s.frames.size() * sizeof(MatchFrame));
  key.append(reinterpret_cast<const char*>(s.ends.data()), s.ends.size() * sizeof(uint32_t));
  return key;
}

}  // namespace

VocabTrie::VocabTrie(const Tokenizer& tokenizer) {
  const int32_t n = tokenizer.n_vocab();
  pieces_.resize(static_cast<size_t>(n));
  std::vector<int32_t> order;
  for (int32_t id = 0; id < n; ++id) {
    if (id == tokenizer.unk_id()) continue;
    std::string piece = tokenizer.TokenToPiece(id);
    if (piece.empty()) continue;
    pieces_[static_cast<size_t>(id)] = std::move(piece);
    order.push_back(id);
  }
  // Sorted pieces give the depth-first order: each piece extends the path of its predecessor's
  // longest common prefix.
  std::sort(order.begin(), order.end(), [&](int32_t x, int32_t y) {
    const std::string& a = pieces_[static_cast<size_t>(x)];
    const std::string& b = pieces_[static_cast<size_t>(y)];
    return a != b ? a < b : x < y;
  });
  std::vector<int32_t> path;  // node index per depth - 1
  std::string prev;
  for (int32_t id : order) {
    const std::string& p = pieces_[static_cast<size_t>(id)];
    size_t common = 0;
    while (common < prev.size() && common < p.size() && prev[common] == p[common]) ++common;
    path.resize(common);
    for (size_t d = common; d < p.size(); ++d) {
      Node node;
      node.byte = static_cast<uint8_t>(p[d]);
      node.depth = static_cast<uint16_t>(d + 1);
      path.push_back(static_cast<int32_t>(nodes_.size()));
      nodes_.push_back(node);
    }
    Node& leaf = nodes_[static_cast<size_t>(path.back())];
    if (leaf.n_tokens == 0) leaf.first_token = static_cast<int32_t>(token_ids_.size());
    token_ids_.push_back(id);
    ++leaf.n_tokens;
    max_depth_ = std::max(max_depth_, static_cast<int>(p.size()));
    prev = p;
  }
  // A subtree ends at the next node no deeper than its root.
  std::vector<int32_t> open;
  for (size_t i = 0; i <= nodes_.size(); ++i) {
    const int depth = i < nodes_.size() ? nodes_[i].depth : 0;
    while (!open.empty() && nodes_[static_cast<size_t>(open.back())].depth >= depth) {
      nodes_[static_cast<size_t>(open.back())].skip = static_cast<int32_t>(i);
      open.pop_back();
    }
    if (i < nodes_.size()) open.push_back(static_cast<int32_t>(i));
  }
}

TokenConstraint::TokenConstraint(std::shared_ptr<const JsonGrammar> grammar, const VocabTrie* trie,
                                 std::vector<int32_t> end_tokens)
    : grammar_(std::move(grammar)),
      trie_(trie),
      end_tokens_(std::move(end_tokens)),
      matcher_(grammar_.get()) {
  levels_.resize(static_cast<size_t>(trie_->max_depth()) + 1);
}

bool TokenConstraint::IsEndToken(int32_t token) const {
  return std::find(end_tokens_.begin(), end_tokens_.end(), token) != end_tokens_.end();
}

const std::vector<uint64_t>& TokenConstraint::Allowed() {
  std::string key = StateKey(matcher_.state());
  if (auto it = cache_.find(key); it != cache_.end()) {
    ++masks_cached_;
    return it->second;
  }
  ++masks_computed_;
  std::vector<uint64_t> bits((static_cast<size_t>(trie_->n_vocab()) + 63) / 64, 0);
  const JsonGrammar& g = matcher_.grammar();
  const std::vector<VocabTrie::Node>& nodes = trie_->nodes();
  const std::vector<int32_t>& ids = trie_->token_ids();
  levels_[0] = matcher_.state();
  const size_t n = nodes.size();
  for (size_t i = 0; i < n;) {
    const VocabTrie::Node& node = nodes[i];
    if (!JsonMatcher::Step(g, levels_[node.depth - 1u], node.byte, &levels_[node.depth])) {
      i = static_cast<size_t>(node.skip);
      continue;
    }
    for (int32_t t = 0; t < node.n_tokens; ++t) {
      const auto id = static_cast<size_t>(ids[static_cast<size_t>(node.first_token + t)]);
      bits[id / 64] |= uint64_t{1} << (id % 64);
    }
    ++i;
  }
  if (cache_.size() >= kMaxCachedStates) cache_.clear();
  return cache_.emplace(std::move(key), std::move(bits)).first->second;
}

bool TokenConstraint::Mask(float* logits, int64_t n_vocab) {
  if (matcher_.IsFreeText()) return true;
  const bool can_end = matcher_.CanEnd();
  const std::vector<uint64_t>& bits = Allowed();
  bool any = false;
  const int64_t n_trie = trie_->n_vocab();
  for (int64_t id = 0; id < n_vocab; ++id) {
    const bool ok = id < n_trie && (bits[static_cast<size_t>(id / 64)] >> (id % 64)) & 1;
    if (ok) {
      any = any || std::isfinite(logits[id]);
    } else if (!(can_end && IsEndToken(static_cast<int32_t>(id)))) {
      logits[id] = -INFINITY;
    } else {
      any = any || std::isfinite(logits[id]);
    }
  }
  return any;
}

bool TokenConstraint::Accept(int32_t token) {
  if (IsEndToken(token)) return matcher_.IsFreeText() || matcher_.CanEnd();
  if (token < 0 || token >= trie_->n_vocab()) return false;
  const std::string& piece = trie_->piece(token);
  if (piece.empty()) return matcher_.IsFreeText();
  return matcher_.Advance(piece);
}

}  // namespace moepool
