#include "coordinator/cluster_control.h"

#include <xxhash.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <set>
#include <thread>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "coordinator/expert_placement.h"
#include "engine/fingerprint.h"
#include "engine/status_macros.h"

namespace moepool {
namespace {

namespace pb = moepool::v1;
using Pair = std::pair<int, int>;

constexpr const char* kKinds[] = {"gate", "up", "down"};

std::vector<Pair> PairsOf(const pb::ExpertSet& set) {
  std::vector<Pair> pairs;
  for (const uint32_t p : set.packed()) pairs.emplace_back(PackedLayer(p), PackedExpert(p));
  return pairs;
}

void SetPairs(const std::vector<Pair>& pairs, pb::ExpertSet* set) {
  std::vector<Pair> sorted = pairs;
  std::sort(sorted.begin(), sorted.end());
  for (const auto& [l, e] : sorted) set->add_packed(PackExpertPair(l, e));
}

bool IsWildcardHost(const std::string& host) {
  return host.empty() || host == "0.0.0.0" || host == "::" || host == "[::]";
}

// The metadata a shard file needs: every scalar of the coordinator's file except the
// tokenizer's and the alignment (the shard writer sets its own), plus the vocabulary size.
std::vector<pb::MetadataEntry> ShardMetadata(const Model& model) {
  std::vector<pb::MetadataEntry> out;
  bool has_vocab = false;
  const std::string vocab_key = model.config().architecture + ".vocab_size";
  for (const auto& [key, v] : model.file().metadata()) {
    if (key.rfind("tokenizer.", 0) == 0 || key == "general.alignment") continue;
    if (v.type == GgufValueType::kArray || v.string_value.size() > 4096) continue;
    pb::MetadataEntry& e = out.emplace_back();
    e.set_key(key);
    e.set_gguf_type(static_cast<uint32_t>(v.type));
    e.set_uint_value(v.uint_value);
    e.set_int_value(v.int_value);
    e.set_float_value(v.float_value);
    e.set_string_value(v.string_value);
    has_vocab = has_vocab || key == vocab_key;
  }
  if (!has_vocab) {
    pb::MetadataEntry& e = out.emplace_back();
    e.set_key(vocab_key);
    e.set_gguf_type(static_cast<uint32_t>(GgufValueType::kUint32));
    e.set_uint_value(static_cast<uint64_t>(model.config().n_vocab));
  }
  return out;
}

}  // namespace

const char* MemberStateName(MemberState state) {
  switch (state) {
    case MemberState::kJoining:
      return "joining";
    case MemberState::kFetching:
      return "fetching";
    case MemberState::kReady:
      return "ready";
    case MemberState::kDraining:
      return "draining";
    case MemberState::kGone:
      return "gone";
  }
  return "gone";
}

namespace {

// The source of a shard tensor name blk.L.ffn_K.E.weight in the coordinator's mapping, or
// nullptr when the name is not of that form or the pair is not bound.
const WeightMatrix* MatrixOf(const Model& model, const std::string& name, int* layer, int* expert) {
  const std::vector<std::string> parts = absl::StrSplit(name, '.');
  if (parts.size() != 5 || parts[0] != "blk" || parts[4] != "weight") return nullptr;
  if (!absl::SimpleAtoi(parts[1], layer) || !absl::SimpleAtoi(parts[3], expert)) return nullptr;
  const ModelConfig& c = model.config();
  if (*layer < 0 || *layer >= c.n_layer || *expert < 0 || *expert >= c.n_expert) return nullptr;
  const ExpertWeights& E = model.layer(*layer).experts[static_cast<size_t>(*expert)];
  if (!E.present()) return nullptr;
  if (parts[2] == "ffn_gate") return &E.gate;
  if (parts[2] == "ffn_up") return &E.up;
  if (parts[2] == "ffn_down") return &E.down;
  return nullptr;
}

std::string ShardTensorName(int layer, const char* kind, int expert) {
  return absl::StrCat("blk.", layer, ".ffn_", kind, ".", expert, ".weight");
}

}  // namespace

ClusterControl::ClusterControl(ClusterExpertBackend* backend, ClusterControlOptions options)
    : backend_(backend), options_(options) {
  const Model& model = backend_->model();
  const ModelConfig& c = model.config();
  std::vector<Pair> all;
  for (int l = 0; l < c.n_layer; ++l) {
    for (int e = 0; e < c.n_expert; ++e) all.emplace_back(l, e);
  }
  model_fingerprint_ = ModelFingerprint(model, all);
  metadata_ = ShardMetadata(model);
  const std::vector<pb::DescribeResponse> workers = backend_->workers();
  for (size_t i = 0; i < workers.size(); ++i) {
    auto m = std::make_unique<Member>();
    m->id = absl::StrCat("w", i);
    m->address = backend_->options().workers[i];
    m->is_static = true;
    m->index = static_cast<int>(i);
    m->state = MemberState::kReady;
    m->pairs = PairsOf(workers[i].experts());
    members_.push_back(std::move(m));
  }
  next_id_ = static_cast<int>(workers.size());
}

ClusterControl::~ClusterControl() = default;

uint64_t ClusterControl::PairBytes(int layer, int expert) const {
  const ExpertWeights& E = backend_->model().layer(layer).experts[static_cast<size_t>(expert)];
  return E.gate.SizeBytes() + E.up.SizeBytes() + E.down.SizeBytes();
}

std::set<std::string> ClusterControl::TensorsOf(const std::vector<Pair>& pairs) {
  std::set<std::string> names;
  for (const auto& [layer, expert] : pairs) {
    for (const char* kind : kKinds) names.insert(ShardTensorName(layer, kind, expert));
  }
  return names;
}

ClusterControl::Member* ClusterControl::Find(const std::string& id) {
  for (auto& m : members_) {
    if (m->id == id) return m.get();
  }
  return nullptr;
}

void ClusterControl::SetState(Member* m, MemberState state, const std::string& why) {
  if (m->state == state) return;
  std::fprintf(stderr, "moepool: cluster: worker %s (%s) %s -> %s%s%s\n", m->id.c_str(),
               m->address.c_str(), MemberStateName(m->state), MemberStateName(state),
               why.empty() ? "" : ": ", why.c_str());
  m->state = state;
  m->last_reason = why;
}

absl::Status ClusterControl::CheckJoin(const pb::JoinRequest& request) const {
  if (request.protocol_version() != pb::CLUSTER_PROTOCOL_VERSION_CURRENT) {
    return absl::FailedPreconditionError(
        absl::StrCat("the worker speaks cluster protocol version ", request.protocol_version(),
                     "; this coordinator speaks version ",
                     static_cast<int>(pb::CLUSTER_PROTOCOL_VERSION_CURRENT)));
  }
  if (request.advertise_address().size() > options_.max_address_bytes) {
    return absl::InvalidArgumentError("advertise_address is too long");
  }
  if (request.cache_size() > static_cast<int>(options_.max_cache_entries)) {
    return absl::InvalidArgumentError(absl::StrCat("the cache list has ", request.cache_size(),
                                                   " entries; at most ",
                                                   options_.max_cache_entries));
  }
  const ModelConfig& c = backend_->model().config();
  const int64_t max_pairs = c.n_layer * c.n_expert;
  for (const pb::CachedModel& cached : request.cache()) {
    if (cached.experts().packed_size() > max_pairs) {
      return absl::InvalidArgumentError("a cache entry lists more pairs than the model has");
    }
  }
  if (request.capacity().memory_bytes() == 0) {
    return absl::InvalidArgumentError("capacity.memory_bytes must be > 0");
  }
  return absl::OkStatus();
}

absl::StatusOr<std::vector<Pair>> ClusterControl::Assign(
    uint64_t memory_bytes, const std::vector<Pair>& cached,
    std::map<std::string, std::vector<Pair>>* moved) const {
  const ModelConfig& c = backend_->model().config();
  std::map<Pair, int> holders;
  uint64_t total = 0;
  int members = 1;  // the new one
  for (int l = 0; l < c.n_layer; ++l) {
    for (int e = 0; e < c.n_expert; ++e) total += PairBytes(l, e);
  }
  for (const auto& m : members_) {
    if (m->state == MemberState::kGone) continue;
    ++members;
    for (const Pair& p : m->pairs) ++holders[p];
  }
  const uint64_t share = std::min<uint64_t>(memory_bytes, (total + members - 1) / members);
  const std::set<Pair> in_cache(cached.begin(), cached.end());
  std::vector<Pair> order;  // expert n-1 on every layer, then n-2, ...
  for (int e = static_cast<int>(c.n_expert) - 1; e >= 0; --e) {
    for (int l = 0; l < c.n_layer; ++l) order.emplace_back(l, e);
  }
  std::stable_partition(order.begin(), order.end(),
                        [&](const Pair& p) { return in_cache.count(p) > 0; });
  std::vector<Pair> out;
  uint64_t bytes = 0;
  for (const Pair& p : order) {  // unheld: cached ones whatever the share, up to the memory
    if (holders.count(p) > 0) continue;
    const uint64_t b = PairBytes(p.first, p.second);
    const uint64_t limit = in_cache.count(p) > 0 ? memory_bytes : share;
    if (bytes + b > limit) continue;
    out.push_back(p);
    bytes += b;
  }
  // Then from the ready worker holding most, while it keeps at least a share.
  std::vector<const Member*> donors;
  for (const auto& m : members_) {
    // Not one in a placement change: what it serves is about to change.
    if (!m->is_static && m->state == MemberState::kReady && !m->changing) donors.push_back(m.get());
  }
  std::sort(donors.begin(), donors.end(),
            [](const Member* a, const Member* b) { return a->pairs.size() > b->pairs.size(); });
  for (const Member* d : donors) {
    // What it keeps: its pairs less those already promised to workers not ready yet.
    uint64_t donor_bytes = 0;
    for (const Pair& p : d->pairs) donor_bytes += PairBytes(p.first, p.second);
    for (const auto& m : members_) {
      const auto promised = m->moved.find(d->id);
      if (m->state == MemberState::kGone || promised == m->moved.end()) continue;
      for (const Pair& p : promised->second) {
        donor_bytes -= std::min(donor_bytes, PairBytes(p.first, p.second));
      }
    }
    const std::set<Pair> held(d->pairs.begin(), d->pairs.end());
    for (const Pair& p : order) {
      if (held.count(p) == 0 || holders[p] > 1) continue;
      const uint64_t b = PairBytes(p.first, p.second);
      if (bytes + b > share || donor_bytes < share + b) continue;
      out.push_back(p);
      (*moved)[d->id].push_back(p);
      bytes += b;
      donor_bytes -= b;
    }
  }
  if (out.empty()) {
    uint64_t smallest = UINT64_MAX;
    for (const Pair& p : order) smallest = std::min(smallest, PairBytes(p.first, p.second));
    if (memory_bytes < smallest) {
      return absl::ResourceExhaustedError(
          absl::StrCat("the worker's memory budget (", memory_bytes,
                       " bytes) holds no expert; the smallest needs ", smallest, " bytes"));
    }
    return absl::UnavailableError(
        "nothing to assign now: every expert is held or being fetched by another worker; "
        "retrying later");
  }
  std::sort(out.begin(), out.end());
  return out;
}

pb::TensorChecksum ClusterControl::ChecksumOf(const TensorSource& source) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    const auto it = checksums_.find(source.name);
    if (it != checksums_.end()) return it->second;
  }
  // Hashing a large tensor takes a while: not under the lock (two threads may both compute it).
  const XXH128_hash_t h = XXH3_128bits(source.matrix->data, source.matrix->SizeBytes());
  pb::TensorChecksum sum;
  sum.set_high(h.high64);
  sum.set_low(h.low64);
  std::lock_guard<std::mutex> lock(mu_);
  checksums_[source.name] = sum;
  return sum;
}

void ClusterControl::FillShard(const std::vector<Pair>& pairs, pb::JoinResponse* response) {
  const Model& model = backend_->model();
  const ModelConfig& c = model.config();
  response->mutable_model()->set_fingerprint(model_fingerprint_);
  response->mutable_model()->set_name(c.name);
  response->mutable_model()->set_file_bytes(model.file().file_size());
  pb::Hyperparameters* h = response->mutable_hparams();
  h->set_n_embd(c.n_embd);
  h->set_n_ff(c.n_ff);
  h->set_n_layer(c.n_layer);
  h->set_n_expert(c.n_expert);
  h->set_n_expert_used(c.n_expert_used);
  SetPairs(pairs, response->mutable_experts());
  for (const auto& e : metadata_) *response->add_metadata() = e;
  for (const auto& [layer, expert] : pairs) {
    for (const char* kind : kKinds) {
      TensorSource source;
      source.name = ShardTensorName(layer, kind, expert);
      source.matrix = MatrixOf(model, source.name, &source.layer, &source.expert);
      pb::ShardTensorInfo* t = response->add_tensors();
      t->set_name(source.name);
      t->set_type(static_cast<uint32_t>(source.matrix->type));
      t->add_dims(source.matrix->cols);
      t->add_dims(source.matrix->rows);
      t->set_bytes(source.matrix->SizeBytes());
      *t->mutable_checksum() = ChecksumOf(source);
      t->set_layer(layer);
      t->set_expert(expert);
    }
  }
}

absl::StatusOr<pb::JoinResponse> ClusterControl::Join(const pb::JoinRequest& request,
                                                      const std::string& peer_host) {
  RETURN_IF_ERROR(CheckJoin(request));
  const std::string advertised = request.advertise_address();
  const size_t colon = advertised.rfind(':');
  int port = 0;
  if (colon == std::string::npos || !absl::SimpleAtoi(advertised.substr(colon + 1), &port) ||
      port < 1 || port > 65535) {
    return absl::InvalidArgumentError(
        absl::StrCat("advertise_address must be HOST:PORT, got '", advertised, "'"));
  }
  const std::string host = advertised.substr(0, colon);
  const std::string address = absl::StrCat(IsWildcardHost(host) ? peer_host : host, ":", port);
  const ModelConfig& c = backend_->model().config();
  std::vector<Pair> cached;
  for (const pb::CachedModel& entry : request.cache()) {
    if (entry.model_fingerprint() != model_fingerprint_) continue;
    for (const Pair& p : PairsOf(entry.experts())) {
      if (p.first >= c.n_layer || p.second >= c.n_expert) {
        return absl::InvalidArgumentError("a cache entry names a pair outside the model");
      }
      cached.push_back(p);
    }
  }
  int previous_index = -1;
  std::string previous_id;
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (auto& m : members_) {  // the same worker again (restarted before its loss was seen)
      if (m->address != address || m->is_static) continue;
      previous_index = m->index;
      previous_id = m->id;
    }
  }
  if (!previous_id.empty()) {
    const absl::Status drained = Drain(previous_id, "the same address joined again");
    (void)drained;  // already gone is fine
  }
  std::unique_lock<std::mutex> lock(mu_);
  std::map<std::string, std::vector<Pair>> moved;
  ASSIGN_OR_RETURN(std::vector<Pair> pairs,
                   Assign(request.capacity().memory_bytes(), cached, &moved));
  Member* m = previous_id.empty() ? nullptr : Find(previous_id);
  if (m == nullptr) {
    members_.push_back(std::make_unique<Member>());
    m = members_.back().get();
    m->id = absl::StrCat("w", next_id_++);
    m->state = MemberState::kGone;
  }
  m->address = address;
  m->index = previous_index;
  m->pairs = pairs;
  m->moved = std::move(moved);
  m->capacity = request.capacity();
  m->bytes_fetched = 0;
  m->drained = false;
  ++m->generation;
  m->tensors = TensorsOf(pairs);
  m->changing = false;  // a change it was part of goes on without it
  m->change_ready = false;
  m->reassign.reset();
  SetState(m, MemberState::kJoining, "");
  pb::JoinResponse response;
  response.set_worker_id(m->id);
  response.set_placement_version(backend_->placement_version());
  const std::string id = m->id;
  lock.unlock();
  FillShard(pairs, &response);  // checksums: reads the tensors, without the lock
  lock.lock();
  m = Find(id);
  if (m != nullptr && m->state == MemberState::kJoining) {
    uint64_t bytes = 0;
    for (const Pair& p : pairs) bytes += PairBytes(p.first, p.second);
    SetState(m, MemberState::kFetching,
             absl::StrCat(pairs.size(), " experts, ", bytes >> 20, " MiB; ",
                          DescribeExpertPairs(pairs)));
  }
  return response;
}

}  // namespace moepool
