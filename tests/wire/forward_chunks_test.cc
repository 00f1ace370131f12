// The framing of Forward rounds: what WriteRequestChunks writes, RequestAssembler puts back
// together bit for bit (and refuses whatever does not frame); what WriteResponseChunks writes,
// ResponseAssembler puts back together.
#include "wire/forward_chunks.h"

#include <cmath>
#include <cstring>
#include <vector>

#include "gtest/gtest.h"

namespace moepool::wire {
namespace {

namespace pb = ::moepool::v1;
using Outcome = RequestAssembler::Outcome;

constexpr int64_t kEmbd = 4;

// Five rows of the coordinator's batch, three of which (4, 1, 3) go to this worker, k = 2.
struct Batch {
  std::vector<float> x;
  std::vector<int64_t> rows = {4, 1, 3};
  std::vector<int32_t> expert = {0, 2, 1, -1, 2, 3};
  std::vector<float> weight = {0.5f, 0.25f, 1.0f, 0.0f, 0.75f, 0.125f};
  Batch() {
    for (int i = 0; i < 5 * kEmbd; ++i) x.push_back(std::ldexp(static_cast<float>(i) + 0.1f, -3));
  }
  RequestRows Rows() const { return RequestRows{x.data(), rows, expert, weight}; }
};

RoundHeader Header(uint64_t round, pb::DType dtype, int64_t total_rows) {
  return RoundHeader{round, 1, dtype, dtype, kEmbd, total_rows, 2};
}

std::vector<pb::ForwardRequest> Chunks(const RoundHeader& h, const Batch& b, int64_t per_chunk) {
  std::vector<pb::ForwardRequest> out;
  pb::ForwardRequest scratch;
  uint64_t bytes = 0;
  EXPECT_TRUE(WriteRequestChunks(
      h, b.Rows(), per_chunk,
      [&](const pb::ForwardRequest& c) {
        out.push_back(c);
        return true;
      },
      &scratch, &bytes));
  uint64_t sum = 0;
  for (const auto& c : out) sum += c.ByteSizeLong();
  EXPECT_EQ(bytes, sum);
  return out;
}

RequestLimits Limits() { return RequestLimits{kEmbd, 64, 8}; }

TEST(ForwardChunksTest, RowsPerChunkFitsTheLimit) {
  // 4096 f32 values + 2 pairs per row: 16414 bytes; 4 MiB holds 255 such rows.
  EXPECT_EQ(RowsPerChunk(4 << 20, 4096, pb::DTYPE_F32, 2), 255);
  EXPECT_EQ(RowsPerChunk(4096, 4096, pb::DTYPE_F32, 2), 1);
  EXPECT_EQ(RowsPerPayload(3 * 4096 * 2 + 100, 4096, pb::DTYPE_F16), 3);
  EXPECT_EQ(RowsPerPayload(10, 4096, pb::DTYPE_F32), 1);
}

TEST(ForwardChunksTest, ChunkedRequestReassemblesBitForBitInEveryDType) {
  const Batch b;
  for (const pb::DType dtype : {pb::DTYPE_F32, pb::DTYPE_F16, pb::DTYPE_BF16}) {
    for (const int64_t per_chunk : {1, 2, 3}) {
      const std::vector<pb::ForwardRequest> chunks = Chunks(Header(7, dtype, 3), b, per_chunk);
      ASSERT_EQ(chunks.size(), static_cast<size_t>((3 + per_chunk - 1) / per_chunk));
      RequestAssembler a(Limits());
      for (size_t i = 0; i < chunks.size(); ++i) {
        EXPECT_EQ(a.Add(chunks[i]),
                  i + 1 < chunks.size() ? Outcome::kIncomplete : Outcome::kComplete);
        EXPECT_TRUE(a.refusals().empty());
      }
      EXPECT_EQ(a.round().step_id(), 7u);
      EXPECT_TRUE(a.round().rows().empty());
      EXPECT_EQ(a.expert(), b.expert);
      EXPECT_EQ(a.weight(), b.weight);
      // The rows are the gathered rows, through the codec.
      std::string want_bytes;
      EncodeGatheredRows(dtype, b.x.data(), kEmbd, b.rows, &want_bytes);
      std::vector<float> want(3 * kEmbd);
      ASSERT_TRUE(DecodeRows(dtype, want_bytes, 3 * kEmbd, want.data()).ok());
      ASSERT_EQ(a.x().size(), want.size());
      EXPECT_EQ(std::memcmp(a.x().data(), want.data(), want.size() * 4), 0);
    }
  }
}

TEST(ForwardChunksTest, ZeroRowRoundIsOneCompleteChunk) {
  Batch b;
  b.rows.clear();
  b.expert.clear();
  b.weight.clear();
  const auto chunks = Chunks(Header(3, pb::DTYPE_F32, 0), b, 4);
  ASSERT_EQ(chunks.size(), 1u);
  RequestAssembler a(Limits());
  EXPECT_EQ(a.Add(chunks[0]), Outcome::kComplete);
  EXPECT_TRUE(a.x().empty());
}

TEST(ForwardChunksTest, BadChunkRefusesItsRoundAndTheRestIsDroppedSilently) {
  const Batch b;
  std::vector<pb::ForwardRequest> bad = Chunks(Header(5, pb::DTYPE_F32, 3), b, 1);
  bad[0].set_n_embd(8);  // not the model's
  const auto good = Chunks(Header(6, pb::DTYPE_F32, 3), b, 3);
  RequestAssembler a(Limits());
  EXPECT_EQ(a.Add(bad[0]), Outcome::kRefused);
  ASSERT_EQ(a.refusals().size(), 1u);
  EXPECT_EQ(a.refusals()[0].header.step_id(), 5u);
  EXPECT_NE(a.refusals()[0].status.message().find("n_embd 8"), std::string::npos);
  EXPECT_EQ(a.Add(bad[1]), Outcome::kDropped);
  EXPECT_EQ(a.Add(bad[2]), Outcome::kDropped);
  EXPECT_TRUE(a.refusals().empty());
  EXPECT_EQ(a.Add(good[0]), Outcome::kComplete);  // the stream goes on
}

TEST(ForwardChunksTest, EveryFramingErrorIsNamed) {
  const Batch b;
  struct Case {
    const char* what;
    void (*mutate)(pb::ForwardRequest*);
    const char* message;
  };
  const Case cases[] = {
      {"dtype", [](pb::ForwardRequest* c) { c->set_dtype(pb::DType(9)); }, "unknown dtype 9"},
      {"total", [](pb::ForwardRequest* c) { c->set_total_rows(65); }, "total_rows 65"},
      {"k", [](pb::ForwardRequest* c) { c->set_k(9); }, "k 9 is outside [1, 8]"},
      {"offset", [](pb::ForwardRequest* c) { c->set_row_offset(2); }, "do not fit total_rows"},
      {"bytes", [](pb::ForwardRequest* c) { c->mutable_rows()->pop_back(); }, "chunk rows hold"},
      {"pairs", [](pb::ForwardRequest* c) { c->add_expert(1); }, "expected n_rows x k"},
      {"pipe with rows", [](pb::ForwardRequest* c) { c->set_nccl_session(4); }, "without rows"},
  };
  for (const Case& c : cases) {
    pb::ForwardRequest chunk = Chunks(Header(1, pb::DTYPE_F32, 3), b, 2)[0];
    c.mutate(&chunk);
    RequestAssembler a(Limits());
    EXPECT_EQ(a.Add(chunk), Outcome::kRefused) << c.what;
    ASSERT_EQ(a.refusals().size(), 1u) << c.what;
    EXPECT_NE(a.refusals()[0].status.message().find(c.message), std::string::npos)
        << c.what << ": " << a.refusals()[0].status;
  }
}

TEST(ForwardChunksTest, InterruptedAndAbandonedRoundsAreRefused) {
  const Batch b;
  const auto first = Chunks(Header(1, pb::DTYPE_F32, 3), b, 2);
  const auto second = Chunks(Header(2, pb::DTYPE_F32, 3), b, 3);
  RequestAssembler a(Limits());
  EXPECT_EQ(a.Add(first[0]), Outcome::kIncomplete);
  EXPECT_EQ(a.Add(second[0]), Outcome::kComplete);  // round 1 never finished
  ASSERT_EQ(a.refusals().size(), 1u);
  EXPECT_EQ(a.refusals()[0].header.step_id(), 1u);
  EXPECT_NE(a.refusals()[0].status.message().find("request ended at row 2 of 3"),
            std::string::npos);
  // A chunk that skips rows, then the stream ends mid-round.
  EXPECT_EQ(a.Add(first[0]), Outcome::kIncomplete);
  pb::ForwardRequest skip = first[1];
  skip.set_row_offset(1);
  skip.set_n_rows(1);
  skip.clear_rows();
  EncodeRows(pb::DTYPE_F32, b.x.data(), kEmbd, skip.mutable_rows());
  skip.clear_expert();
  skip.clear_weight();
  for (int i = 0; i < 2; ++i) skip.add_expert(i), skip.add_weight(1);
  EXPECT_EQ(a.Add(skip), Outcome::kRefused);
  EXPECT_NE(a.refusals()[0].status.message().find("does not continue the request"),
            std::string::npos);
  RequestAssembler::Refusal r;
  EXPECT_FALSE(a.Abandon(&r));  // the refused round is over
  EXPECT_EQ(a.Add(first[0]), Outcome::kIncomplete);
  ASSERT_TRUE(a.Abandon(&r));
  EXPECT_NE(r.status.message().find("stream closed at row 2 of 3"), std::string::npos);
}

TEST(ForwardChunksTest, PipeRoundIsOneMessageWithTheRowsBesideIt) {
  const Batch b;
  pb::ForwardRequest request;
  std::string bytes;
  BuildPipeRequest(Header(9, pb::DTYPE_BF16, 3), b.Rows(), 77, &request, &bytes);
  EXPECT_EQ(request.nccl_session(), 77u);
  EXPECT_TRUE(request.rows().empty());
  EXPECT_EQ(bytes.size(), 3u * kEmbd * 2);
  RequestAssembler a(Limits());
  EXPECT_EQ(a.Add(request), Outcome::kPipe);
}

TEST(ForwardChunksTest, ResponseChunksReassembleAndRejectOverlapOrMismatch) {
  std::vector<float> y(5 * kEmbd);
  for (size_t i = 0; i < y.size(); ++i) y[i] = static_cast<float>(i) * 0.5f;
  const RoundHeader h = Header(4, pb::DTYPE_F32, 5);
  std::vector<pb::ForwardResponse> chunks;
  WriteResponseChunks(h, y.data(), 2, 123, [&] { return &chunks.emplace_back(); });
  ASSERT_EQ(chunks.size(), 3u);
  EXPECT_EQ(chunks[2].n_rows(), 1);
  EXPECT_EQ(chunks[1].compute_micros(), 123u);
  ResponseAssembler a(h);
  ASSERT_TRUE(a.Add(chunks[2]).ok());
  EXPECT_FALSE(a.Add(chunks[2]).ok());  // twice
  pb::ForwardResponse other = chunks[0];
  other.set_dtype(pb::DTYPE_F16);
  EXPECT_NE(a.Add(other).message().find("answer in f16 to a request for f32 rows"),
            std::string::npos);
  other = chunks[0];
  other.set_total_rows(6);
  EXPECT_FALSE(a.Add(other).ok());
  ASSERT_TRUE(a.Add(chunks[0]).ok());
  EXPECT_FALSE(a.complete());
  ASSERT_TRUE(a.Add(chunks[1]).ok());
  EXPECT_TRUE(a.complete());
  EXPECT_EQ(a.values(), y);
}

}  // namespace
}  // namespace moepool::wire
