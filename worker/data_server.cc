#include "worker/data_server.h"

#include <chrono>
#include <vector>

#include "absl/strings/str_cat.h"
#include "moepool/v1/expert_service.pb.h"
#include "wire/forward_chunks.h"

namespace moepool::worker {
namespace {

namespace pb = ::moepool::v1;

void Refuse(const pb::ForwardRequest& request, const absl::Status& error,
            pb::ForwardResponse* response) {
  wire::SetResponseHeader(request, response);
  response->set_error_code(static_cast<int>(error.code()));
  response->set_error_message(std::string(error.message()));
}

}  // namespace

absl::StatusOr<std::unique_ptr<DataServer>> DataServer::Start(
    WorkerCore* core, const wire::DataListenerOptions& options, size_t response_chunk_bytes) {
  auto server = std::unique_ptr<DataServer>(new DataServer(core, response_chunk_bytes));
  DataServer* s = server.get();
  auto listener =
      wire::DataListener::Start(options, [s](wire::DataStream* stream) { s->Serve(stream); });
  if (!listener.ok()) return listener.status();
  server->listener_ = *std::move(listener);
  return server;
}

void DataServer::Serve(wire::DataStream* stream) {
  const ModelConfig& c = core_->config();
  wire::RequestAssembler assembler(
      wire::RequestLimits{c.n_embd, core_->max_rows(), static_cast<int>(c.n_expert)});
  pb::ForwardRequest chunk;
  pb::ForwardResponse response;          // refusals
  std::vector<pb::ForwardResponse> out;  // result chunks (reused)
  std::vector<float> result;
  auto send = [&](const pb::ForwardResponse& r) { return stream->Write(r).ok(); };
  while (stream->Read(&chunk).ok()) {
    const wire::RequestAssembler::Outcome outcome = assembler.Add(chunk);
    for (const auto& refusal : assembler.refusals()) {
      response.Clear();
      Refuse(refusal.header, refusal.status, &response);
      if (!send(response)) return;
    }
    if (outcome == wire::RequestAssembler::Outcome::kPipe) {
      response.Clear();
      Refuse(chunk, absl::InvalidArgumentError("no NCCL session on the data channel"), &response);
      if (!send(response)) return;
      continue;
    }
    if (outcome != wire::RequestAssembler::Outcome::kComplete) continue;
    const pb::ForwardRequest& round = assembler.round();
    ComputeRequest compute;
    compute.layer = round.layer();
    compute.x = assembler.x().data();
    compute.n_rows = round.total_rows();
    compute.n_embd = round.n_embd();
    compute.k = round.k();
    compute.expert = assembler.expert().data();
    compute.expert_count = assembler.expert().size();
    compute.weight = assembler.weight().data();
    compute.weight_count = assembler.weight().size();
    const auto start = std::chrono::steady_clock::now();
    const absl::Status s = core_->Compute(compute, &result);
    const auto micros = std::chrono::duration_cast<std::chrono::microseconds>(
                            std::chrono::steady_clock::now() - start)
                            .count();
    ++requests_;
    if (!s.ok()) {
      response.Clear();
      Refuse(round, s, &response);
      if (!send(response)) return;
      continue;
    }
    const wire::RoundHeader header = wire::HeaderOf(round);
    size_t chunks = 0;
    wire::WriteResponseChunks(header, result.data(),
                              wire::RowsPerPayload(static_cast<int64_t>(response_chunk_bytes_),
                                                   header.n_embd, header.return_dtype),
                              static_cast<uint64_t>(micros), [&] {
                                if (chunks == out.size()) out.emplace_back();
                                pb::ForwardResponse* r = &out[chunks++];
                                r->Clear();
                                return r;
                              });
    for (size_t i = 0; i < chunks; ++i) {
      if (!send(out[i])) return;
    }
  }
}

}  // namespace moepool::worker
