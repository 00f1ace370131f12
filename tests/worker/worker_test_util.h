// Routed rows for the worker tests, and the single-process result they must reproduce.
#ifndef MOEPOOL_TESTS_WORKER_WORKER_TEST_UTIL_H_
#define MOEPOOL_TESTS_WORKER_WORKER_TEST_UTIL_H_

#include <cstdint>
#include <string>
#include <vector>

#include "engine/model.h"
#include "moepool/v1/expert_service.pb.h"
#include "worker/worker_core.h"

namespace moepool::testing {

struct TestRoutes {
  int layer = 0;
  int64_t n_rows = 0;
  int64_t n_embd = 0;
  int k = 0;
  std::vector<float> x;         // [n_rows x n_embd], N(0, 1)
  std::vector<int32_t> expert;  // [n_rows x k], ascending per row, -1 padding
  std::vector<float> weight;    // [n_rows x k], positive
};

// Rows of `layer` routed to up to k distinct experts drawn from `allowed` (every row gets at
// least one; every few rows one slot is -1 = none), deterministic in `seed`.
TestRoutes MakeRoutes(int layer, int64_t n_rows, int64_t n_embd, int k,
                      const std::vector<int>& allowed, uint32_t seed);

// LocalExpertBackend on `model` (which must hold the routed experts) for these routes.
std::vector<float> LocalResult(const Model& model, const TestRoutes& routes);

// A WorkerCore request over `routes` (borrows its vectors).
worker::ComputeRequest RequestFor(const TestRoutes& routes);

// wire::EncodeRows / wire::DecodeRows over whole vectors.
std::string EncodeRows(const std::vector<float>& values, moepool::v1::DType dtype);
std::vector<float> DecodeRows(const std::string& bytes, moepool::v1::DType dtype);

}  // namespace moepool::testing

#endif  // MOEPOOL_TESTS_WORKER_WORKER_TEST_UTIL_H_
