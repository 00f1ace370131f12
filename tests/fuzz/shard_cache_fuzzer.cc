// Fuzz target for the worker's shard-file reader (worker/shard_cache.h): whatever a cache
// directory holds under the names a shard file of a known manifest would have, Materialize must
// end with that shard file complete and correct, fetching what does not verify. A corrupted,
// truncated or hostile file is detected and repaired, never trusted.
//
// Input: one flag byte, then the bytes of a file. The manifest is fixed per process: the expert
// tensors of pairs (0, 0) and (0, 1) of a small synthesized model (per-expert names
// blk.L.ffn_{gate,up,down}.E.weight, dims {cols, rows} of the bound matrix, XXH3 checksums of its
// bytes; as ClusterControl::FillShard builds it). The bytes are written into an empty cache
// directory under
//   flag bit 0: the shard file's name (FileNameFor)
//   flag bit 1: its `.partial` name
//   flag bit 2: the name of another shard file of the same model (a source of tensors)
// (no bit set: the shard file's name). Then Inventory() and Materialize() with a fetcher that
// serves the right bytes, and checks: Materialize succeeds; the file it names has this
// manifest's header and every tensor's bytes at its place (GgufWriter's layout); the bytes
// fetched and reused add up to the manifest's; an input that is the valid file itself under
// its name is used untouched; a second Materialize uses the file untouched without fetching;
// Inventory() lists only files inside the directory, and then the complete shard with its pairs.
//
// The model is a custom shape (32/64, 2 layers, 2 experts, Q4_0), not "tiny": its shard file is
// about 8 KB, so the fuzzer's mutations land in the header and tensor index as often as in the
// data (a tiny shard file is 760 KB), and the committed seeds stay small.
//
// With clang in the fuzzing configuration (tests/fuzz/run_fuzz.sh ... shard; worker/ built with
// -fsanitize=fuzzer-no-link,address) this is a libFuzzer target. Otherwise it is a replay driver
// (ctest ShardCacheFuzzerReplay; tests/fuzz/replay_driver.h): it runs the target over seeds made
// from the valid shard file (the file under each name, truncations, byte flips in the header, the
// index and the data), single-byte corruptions of them, and the files and directories named on
// the command line; --write-seeds DIR writes the seeds as files, --one FILE... runs just those
// inputs.
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <memory>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "engine/fingerprint.h"
#include "engine/gguf_writer.h"
#include "engine/model.h"
#include "engine/synth.h"
#include "tests/fuzz/fuzz_model_util.h"
#include "worker/shard_cache.h"

namespace {

using ::moepool::worker::ShardCache;
using ::moepool::worker::ShardManifest;
using ::moepool::worker::ShardTensor;

constexpr char kTarget[] = "shard_cache_fuzzer";
constexpr size_t kFetchChunk = 1000;
constexpr const char* kKinds[] = {"gate", "up", "down"};

void Check(bool ok, const std::string& what) {
  if (!ok) moepool::testing::FuzzFail(kTarget, what);
}

std::string ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

void WriteFile(const std::string& path, const char* data, size_t size) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(data, static_cast<std::streamsize>(size));
  Check(out.good(), "cannot write " + path);
}

// Everything fixed per process.
struct Fixture {
  std::unique_ptr<moepool::Model> model;
  ShardManifest manifest;
  std::vector<std::string> source;  // each tensor's bytes, in manifest order
  moepool::GgufWriter::FileLayout layout;
  uint64_t total_bytes = 0;
  std::string dir;         // the cache directory, emptied before each input
  std::string name;        // FileNameFor(manifest)
  std::string other_name;  // another shard file name of the same model
  std::string valid;       // the complete shard file Materialize writes
};

moepool::SynthShape MicroShape() {
  moepool::SynthShape s;
  s.name = "fuzz-micro";
  s.n_embd = 32;
  s.n_ff = 64;
  s.n_layer = 2;
  s.n_head = 4;
  s.n_head_kv = 2;
  s.n_expert = 2;
  s.n_expert_used = 2;
  s.n_ctx = 64;
  return s;
}

// The scalar metadata a coordinator sends (as ClusterControl's ShardMetadata).
std::vector<std::pair<std::string, moepool::GgufValue>> ShardMetadata(const moepool::Model& m) {
  std::vector<std::pair<std::string, moepool::GgufValue>> out;
  bool has_vocab = false;
  const std::string vocab_key = m.config().architecture + ".vocab_size";
  for (const auto& [key, v] : m.file().metadata()) {
    if (key.rfind("tokenizer.", 0) == 0 || key == "general.alignment") continue;
    if (v.type == moepool::GgufValueType::kArray || v.string_value.size() > 4096) continue;
    out.emplace_back(key, v);
    has_vocab = has_vocab || key == vocab_key;
  }
  if (!has_vocab) {
    out.emplace_back(vocab_key,
                     moepool::GgufValue::Uint32(static_cast<uint32_t>(m.config().n_vocab)));
  }
  return out;
}

// Serves the manifest's bytes in chunks, counting calls.
struct Server {
  const Fixture* f = nullptr;
  int calls = 0;

  moepool::worker::TensorFetcher Fetcher() {
    return [this](const ShardTensor& t, uint64_t offset,
                  const std::function<absl::Status(const char*, size_t)>& sink) -> absl::Status {
      ++calls;
      size_t i = 0;
      while (i < f->manifest.tensors.size() && f->manifest.tensors[i].name != t.name) ++i;
      Check(i < f->manifest.tensors.size(), "Materialize asks for " + t.name);
      const std::string& bytes = f->source[i];
      Check(offset <= bytes.size(), absl::StrCat("Materialize asks for offset ", offset));
      for (size_t pos = static_cast<size_t>(offset); pos < bytes.size(); pos += kFetchChunk) {
        const absl::Status s = sink(bytes.data() + pos, std::min(kFetchChunk, bytes.size() - pos));
        if (!s.ok()) return s;
      }
      return absl::OkStatus();
    };
  }
};

moepool::worker::TensorFetcher NoFetcher() {
  return [](const ShardTensor& t, uint64_t,
            const std::function<absl::Status(const char*, size_t)>&) -> absl::Status {
    moepool::testing::FuzzFail(kTarget, "a complete file fetched again: " + t.name);
  };
}

// The file at `path` has the manifest's header and every tensor's bytes at its place.
void CheckShardFile(const Fixture& f, const std::string& path) {
  const std::string bytes = ReadFile(path);
  Check(bytes.size() == f.layout.file_size,
        absl::StrCat("the shard file has ", bytes.size(), " bytes, not ", f.layout.file_size));
  Check(bytes.compare(0, f.layout.header.size(), f.layout.header) == 0,
        "the shard file has another header");
  for (size_t i = 0; i < f.manifest.tensors.size(); ++i) {
    Check(bytes.compare(f.layout.data_offsets[i], f.source[i].size(), f.source[i]) == 0,
          "the shard file has other bytes for " + f.manifest.tensors[i].name);
  }
}

// What Inventory() lists lies in the directory and names pairs as it should.
void CheckInventory(const Fixture& f, const ShardCache& cache) {
  for (const moepool::worker::CachedShard& c : cache.Inventory()) {
    Check(absl::StartsWith(c.path, f.dir + "/") &&
              c.path.find('/', f.dir.size() + 1) == std::string::npos,
          "Inventory lists " + c.path);
    Check(c.complete == absl::EndsWith(c.path, ".gguf"), "Inventory: complete flag of " + c.path);
    for (size_t i = 0; i < c.pairs.size(); ++i) {
      Check(c.pairs[i].first >= 0 && c.pairs[i].first <= 65535 && c.pairs[i].second >= 0 &&
                c.pairs[i].second <= 65535,
            "Inventory: a pair out of range");
      Check(i == 0 || c.pairs[i - 1] < c.pairs[i], "Inventory: pairs not ascending");
    }
  }
}

void ResetDir(const Fixture& f) {
  std::error_code ec;
  std::filesystem::remove_all(f.dir, ec);
  Check(!ec, "cannot empty " + f.dir + ": " + ec.message());
}

const Fixture& Setup() {
  static const Fixture* fixture = [] {
    moepool::testing::QuietStderr();
    auto* f = new Fixture;
    const std::string path =
        moepool::testing::SynthFuzzModel(MicroShape(), "Q4_0", false, "shard-micro.gguf");
    moepool::ExpertFilter filter;
    filter.non_expert = false;
    absl::StatusOr<std::unique_ptr<moepool::Model>> model = moepool::Model::Load(path, filter);
    Check(model.ok(), "cannot load the model: " + model.status().ToString());
    f->model = *std::move(model);
    const moepool::ModelConfig& c = f->model->config();
    std::vector<std::pair<int, int>> all;
    for (int l = 0; l < c.n_layer; ++l) {
      for (int e = 0; e < c.n_expert; ++e) all.emplace_back(l, e);
    }
    f->manifest.model_fingerprint = moepool::ModelFingerprint(*f->model, all);
    f->manifest.metadata = ShardMetadata(*f->model);
    for (const auto& [layer, expert] : std::vector<std::pair<int, int>>{{0, 0}, {0, 1}}) {
      const moepool::ExpertWeights& E = f->model->layer(layer).experts[static_cast<size_t>(expert)];
      const moepool::WeightMatrix* matrices[] = {&E.gate, &E.up, &E.down};
      for (int k = 0; k < 3; ++k) {
        const moepool::WeightMatrix& m = *matrices[k];
        ShardTensor t;
        t.name = absl::StrCat("blk.", layer, ".ffn_", kKinds[k], ".", expert, ".weight");
        t.type = m.type;
        t.dims = {m.cols, m.rows};
        t.bytes = m.SizeBytes();
        t.checksum = moepool::worker::ChecksumOf(m.data, t.bytes);
        t.layer = layer;
        t.expert = expert;
        f->manifest.tensors.push_back(t);
        f->source.emplace_back(reinterpret_cast<const char*>(m.data), t.bytes);
        f->total_bytes += t.bytes;
      }
    }
    const absl::Status valid = moepool::worker::ValidateManifest(f->manifest);
    Check(valid.ok(), "the manifest does not validate: " + valid.ToString());
    moepool::GgufWriter writer;
    for (const auto& [key, value] : f->manifest.metadata) writer.AddMetadata(key, value);
    writer.AddMetadata(moepool::worker::kShardFingerprintKey,
                       moepool::GgufValue::String(f->manifest.model_fingerprint));
    for (const ShardTensor& t : f->manifest.tensors) {
      Check(writer.AddTensor(t.name, t.type, t.dims).ok(), "cannot lay out " + t.name);
    }
    absl::StatusOr<moepool::GgufWriter::FileLayout> layout = writer.Layout();
    Check(layout.ok(), "no layout: " + layout.status().ToString());
    f->layout = *std::move(layout);
    f->dir = moepool::testing::FuzzTempDir() + "/cache";
    f->name = ShardCache::FileNameFor(f->manifest);
    f->other_name = f->manifest.model_fingerprint + "-0123456789abcdef.gguf";
    Check(f->other_name != f->name, "the other shard name is the shard's");
    // The valid file, as Materialize writes it from nothing.
    ResetDir(*f);
    absl::StatusOr<ShardCache> cache = ShardCache::Open(f->dir);
    Check(cache.ok(), "cannot open the cache: " + cache.status().ToString());
    Server server{f};
    absl::StatusOr<moepool::worker::MaterializeResult> made =
        cache->Materialize(f->manifest, server.Fetcher());
    Check(made.ok(), "cannot materialize: " + made.status().ToString());
    f->valid = ReadFile(made->path);
    CheckShardFile(*f, made->path);
    return f;
  }();
  return *fixture;
}

void FuzzOne(const uint8_t* data, size_t size) {
  const Fixture& f = Setup();
  if (size == 0) return;
  const uint8_t flag = data[0] & 7 ? data[0] & 7 : 1;
  const char* bytes = reinterpret_cast<const char*>(data + 1);
  const size_t n = size - 1;
  ResetDir(f);
  absl::StatusOr<ShardCache> cache = ShardCache::Open(f.dir);
  Check(cache.ok(), "cannot open the cache: " + cache.status().ToString());
  const std::string path = f.dir + "/" + f.name;
  if (flag & 1) WriteFile(path, bytes, n);
  if (flag & 2) WriteFile(path + ".partial", bytes, n);
  if (flag & 4) WriteFile(f.dir + "/" + f.other_name, bytes, n);
  CheckInventory(f, *cache);

  Server server{&f};
  const absl::StatusOr<moepool::worker::MaterializeResult> made =
      cache->Materialize(f.manifest, server.Fetcher());
  Check(made.ok(), "Materialize failed: " + made.status().ToString());
  moepool::testing::FuzzTrace(
      kTarget, absl::StrCat("flag ", flag, ", ", n, " bytes: untouched ", made->untouched,
                            ", fetched ", made->tensors_fetched, " tensors (", made->bytes_fetched,
                            " bytes), reused ", made->bytes_reused, " bytes"));
  Check(made->path == path, "Materialize made " + made->path);
  CheckShardFile(f, path);
  Check(made->bytes_fetched + made->bytes_reused == f.total_bytes,
        absl::StrCat("fetched ", made->bytes_fetched, " and reused ", made->bytes_reused, " of ",
                     f.total_bytes, " bytes"));
  Check(server.calls == made->tensors_fetched,
        absl::StrCat(server.calls, " fetches for ", made->tensors_fetched, " tensors"));
  if ((flag & 1) && n == f.valid.size() && std::memcmp(bytes, f.valid.data(), n) == 0) {
    Check(made->untouched && made->bytes_fetched == 0, "the valid file was not used untouched");
  }

  // Now it is complete and trusted as it is.
  const absl::StatusOr<moepool::worker::MaterializeResult> again =
      cache->Materialize(f.manifest, NoFetcher());
  Check(again.ok() && again->untouched && again->bytes_fetched == 0 &&
            again->bytes_reused == f.total_bytes,
        "the repaired file is not used untouched: " +
            (again.ok() ? std::string("fetched or rewritten") : again.status().ToString()));
  CheckInventory(f, *cache);
  bool listed = false;
  for (const moepool::worker::CachedShard& c : cache->Inventory()) {
    if (c.path != path) continue;
    listed = c.complete && c.model_fingerprint == f.manifest.model_fingerprint &&
             c.pairs == std::vector<std::pair<int, int>>{{0, 0}, {0, 1}};
  }
  Check(listed, "Inventory does not list the complete shard file with its pairs");
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  Setup();
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  FuzzOne(data, size);
  return 0;
}

#ifndef MOEPOOL_LIBFUZZER
#include "tests/fuzz/replay_driver.h"

namespace {

std::string Seed(uint8_t flag, const std::string& bytes) {
  return std::string(1, static_cast<char>(flag)) + bytes;
}

std::string Flipped(std::string bytes, size_t at) {
  if (at < bytes.size()) bytes[at] = static_cast<char>(bytes[at] ^ 0x5a);
  return bytes;
}

// Named inputs: the valid file under each name, cut short, with a byte changed in the header
// (magic, tensor count), the tensor index (name, dims, type, offset) and the data, grown, and
// with its data zeroed. Corruptions of each (main) cover the rest.
std::vector<std::pair<std::string, std::string>> Seeds() {
  const Fixture& f = Setup();
  const std::string& v = f.valid;
  const size_t header = f.layout.header.size();
  // Where the index names the first tensor: its name, then n_dims, dims, type and offset.
  const size_t index = v.find(f.manifest.tensors[0].name);
  const size_t after_name = index + f.manifest.tensors[0].name.size();
  const size_t data1 = static_cast<size_t>(f.layout.data_offsets[1]);
  const size_t data3 = static_cast<size_t>(f.layout.data_offsets[3]);
  return {
      {"valid", Seed(1, v)},
      {"valid-partial", Seed(2, v)},
      {"valid-other", Seed(4, v)},
      {"valid-partial-other", Seed(6, v)},
      {"cut-in-header", Seed(1, v.substr(0, header / 2))},
      {"cut-after-header-partial", Seed(2, v.substr(0, header))},
      {"cut-in-tensor-3", Seed(1, v.substr(0, data3 + 5))},
      {"cut-last-byte-partial", Seed(2, v.substr(0, v.size() - 1))},
      {"flip-magic", Seed(1, Flipped(v, 0))},
      {"flip-tensor-count", Seed(1, Flipped(v, 8))},
      {"flip-tensor-name", Seed(1, Flipped(v, index + 4))},
      {"flip-dims", Seed(3, Flipped(v, after_name + 4))},
      {"flip-type", Seed(1, Flipped(v, after_name + 20))},
      {"flip-offset-partial", Seed(2, Flipped(v, after_name + 24))},
      {"flip-data-1-other", Seed(4, Flipped(v, data1 + 3))},
      {"flip-data-3-partial", Seed(2, Flipped(v, data3 + 3))},
      {"grown", Seed(1, v + std::string(1024, 'x'))},
      {"zeroed-data", Seed(1, v.substr(0, header) + std::string(v.size() - header, '\0'))},
  };
}

}  // namespace

int main(int argc, char** argv) {
  moepool::testing::ReplayOptions o;
  o.target = kTarget;
  o.seeds = Seeds();
  // Single-byte corruptions of the flag, of the first 2 KiB (header and index) and sparsely of
  // the rest.
  o.next_corruption = [](size_t at) { return at + (at < 2048 ? 53 : 1501); };
  o.fail = [](const std::string& what) { moepool::testing::FuzzFail(kTarget, what); };
  return moepool::testing::RunReplayDriver(argc, argv, o);
}
#endif
