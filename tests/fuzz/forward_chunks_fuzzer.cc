// Fuzz target for what a worker reads from a coordinator it cannot trust, and what a coordinator
// reads back: a byte string is cut into messages (2-byte little-endian length, then the bytes),
// each parsed as a ForwardRequest and fed to wire::RequestAssembler, and as a ForwardResponse and
// fed to wire::ResponseAssembler. Any sequence must give refusals or complete rounds whose
// buffers match their header (x [total_rows x n_embd], expert and weight [total_rows x k]),
// never a crash, a hang or an allocation past the limits.
//
// With clang in the fuzzing configuration (tests/fuzz/run_fuzz.sh forward; proto/ and wire/
// built with -fsanitize=fuzzer-no-link,address) this is a libFuzzer target. Otherwise it is a
// replay driver (ctest ForwardChunksFuzzerReplay; tests/fuzz/replay_driver.h): it runs the target
// over seeds it writes from wire::WriteRequestChunks / WriteResponseChunks (every dtype, chunked
// and whole, a pipe round), their single-byte corruptions, and the files and directories named on
// the command line; --write-seeds DIR writes the seeds as files, --one FILE... runs just those
// inputs.
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "google/protobuf/stubs/logging.h"
#include "wire/forward_chunks.h"

namespace {

namespace pb = ::moepool::v1;
using ::moepool::wire::RequestAssembler;

constexpr int64_t kEmbd = 8;
constexpr int64_t kMaxRows = 64;
constexpr int kExperts = 8;

void Check(bool ok, const char* what) {
  if (!ok) {
    std::fprintf(stderr, "forward_chunks_fuzzer: %s\n", what);
    std::abort();
  }
}

void FuzzOne(const uint8_t* data, size_t size) {
  // Hostile strings are not UTF-8; protobuf would log each one.
  static const bool silenced = (google::protobuf::SetLogHandler(nullptr), true);
  (void)silenced;
  RequestAssembler requests(moepool::wire::RequestLimits{kEmbd, kMaxRows, kExperts});
  moepool::wire::ResponseAssembler responses(
      moepool::wire::RoundHeader{1, 0, pb::DTYPE_F32, pb::DTYPE_F32, kEmbd, 4, 2});
  pb::ForwardRequest request;
  pb::ForwardResponse response;
  size_t pos = 0;
  while (pos + 2 <= size) {
    size_t len = static_cast<size_t>(data[pos]) | (static_cast<size_t>(data[pos + 1]) << 8);
    pos += 2;
    len = std::min(len, size - pos);
    if (request.ParseFromArray(data + pos, static_cast<int>(len))) {
      if (requests.Add(request) == RequestAssembler::Outcome::kComplete) {
        const pb::ForwardRequest& r = requests.round();
        const size_t rows = static_cast<size_t>(r.total_rows());
        Check(r.n_embd() == kEmbd && rows <= kMaxRows, "a complete round outside the limits");
        Check(requests.x().size() == rows * kEmbd, "rows do not match the header");
        Check(requests.expert().size() == rows * static_cast<size_t>(r.k()) &&
                  requests.weight().size() == requests.expert().size(),
              "pairs do not match the header");
      }
    }
    if (response.ParseFromArray(data + pos, static_cast<int>(len))) {
      responses.Add(response).IgnoreError();
      Check(responses.values().size() == 4 * kEmbd, "response buffer resized");
    }
    pos += len;
  }
  RequestAssembler::Refusal refusal;
  requests.Abandon(&refusal);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  FuzzOne(data, size);
  return 0;
}

#ifndef MOEPOOL_LIBFUZZER
#include "tests/fuzz/replay_driver.h"

namespace {

void AppendMessage(const google::protobuf::MessageLite& m, std::string* out) {
  const std::string bytes = m.SerializeAsString();
  const size_t len = std::min<size_t>(bytes.size(), 0xffff);
  out->push_back(static_cast<char>(len & 0xff));
  out->push_back(static_cast<char>(len >> 8));
  out->append(bytes, 0, len);
}

// Valid exchanges: rounds of 1-5 rows in every dtype, whole and in chunks of 1-2 rows, a pipe
// round, and the responses to a 4-row round.
std::vector<std::string> Seeds() {
  std::vector<float> x(5 * kEmbd);
  for (size_t i = 0; i < x.size(); ++i) x[i] = 0.25f * static_cast<float>(i) - 3.0f;
  const std::vector<int64_t> rows = {4, 0, 2, 1, 3};
  const std::vector<int32_t> expert = {0, 5, 1, -1, 2, 7, 3, 4, 6, 7};
  const std::vector<float> weight = {0.5f, 0.5f, 1, 0, 0.25f, 0.75f, 0.1f, 0.9f, 0.6f, 0.4f};
  std::vector<std::string> seeds;
  uint64_t round = 1;
  for (const pb::DType dtype : {pb::DTYPE_F32, pb::DTYPE_F16, pb::DTYPE_BF16}) {
    for (int64_t n = 1; n <= 5; n += 2) {
      for (int64_t per = 1; per <= 2; ++per) {
        std::string seed;
        const moepool::wire::RequestRows r{
            x.data(), absl::MakeConstSpan(rows).subspan(0, static_cast<size_t>(n)),
            absl::MakeConstSpan(expert).subspan(0, static_cast<size_t>(2 * n)),
            absl::MakeConstSpan(weight).subspan(0, static_cast<size_t>(2 * n))};
        pb::ForwardRequest scratch;
        uint64_t bytes = 0;
        moepool::wire::WriteRequestChunks(
            {round++, 1, dtype, dtype, kEmbd, n, 2}, r, per,
            [&](const pb::ForwardRequest& c) {
              AppendMessage(c, &seed);
              return true;
            },
            &scratch, &bytes);
        seeds.push_back(seed);
      }
    }
  }
  std::string pipe;
  pb::ForwardRequest request;
  std::string pipe_rows;
  moepool::wire::BuildPipeRequest(
      {round++, 0, pb::DTYPE_F32, pb::DTYPE_F32, kEmbd, 2, 2},
      {x.data(), absl::MakeConstSpan(rows).subspan(0, 2), absl::MakeConstSpan(expert).subspan(0, 4),
       absl::MakeConstSpan(weight).subspan(0, 4)},
      7, &request, &pipe_rows);
  AppendMessage(request, &pipe);
  seeds.push_back(pipe);
  std::string answers;
  std::vector<pb::ForwardResponse> out;
  moepool::wire::WriteResponseChunks({1, 0, pb::DTYPE_F32, pb::DTYPE_F32, kEmbd, 4, 2}, x.data(), 3,
                                     10, [&] { return &out.emplace_back(); });
  for (const auto& m : out) AppendMessage(m, &answers);
  seeds.push_back(answers);
  return seeds;
}

}  // namespace

int main(int argc, char** argv) {
  moepool::testing::ReplayOptions o;
  o.target = "forward_chunks_fuzzer";
  const std::vector<std::string> seeds = Seeds();
  for (size_t i = 0; i < seeds.size(); ++i) {
    o.seeds.emplace_back("seed-" + std::to_string(i), seeds[i]);
  }
  return moepool::testing::RunReplayDriver(argc, argv, o);
}
#endif
