// Shared helpers for comparing moepool logits with the reference files.
#ifndef MOEPOOL_TESTS_ENGINE_CONFORMANCE_UTIL_H_
#define MOEPOOL_TESTS_ENGINE_CONFORMANCE_UTIL_H_

#include <cstdint>
#include <string>
#include <vector>

namespace moepool::testing {

struct ReferenceCase {
  int64_t n_vocab = 0;
  std::vector<int32_t> prompt_tokens;  // BOS first
  std::vector<int32_t> greedy_tokens;
  std::vector<float> logits;  // [n_prompt x n_vocab]
};

// Reads M.pK.json and M.pK.logits.f32 from the conformance directory.
ReferenceCase ReadReferenceCase(const std::string& model, const std::string& prompt);

// Per-position NMSE = mean((a-b)^2)/mean(b^2) over rows of width n_vocab.
std::vector<double> RowNmse(const std::vector<float>& a, const std::vector<float>& b,
                            int64_t n_vocab);
// Number of rows whose argmax agrees.
int Top1Agreement(const std::vector<float>& a, const std::vector<float>& b, int64_t n_vocab);
double Median(std::vector<double> v);
int32_t Argmax(const float* row, int64_t n);

}  // namespace moepool::testing

#endif  // MOEPOOL_TESTS_ENGINE_CONFORMANCE_UTIL_H_
