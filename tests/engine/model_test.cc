// Model loading: hyperparameters, errors on broken files (copies of a synthesized tiny model with
// one thing altered), the two expert layouts, and ExpertFilter binding.
#include "engine/model.h"

#include <cstring>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include "engine/engine.h"
#include "engine/moe_ffn.h"
#include "gtest/gtest.h"
#include "tests/engine/tiny_model_util.h"
#include "tests/testdata.h"

namespace moepool {
namespace {

using ::moepool::testing::CopyGgufWithEdits;
using ::moepool::testing::GgufEdits;
using ::moepool::testing::PseudoRandomPrompt;
using ::moepool::testing::TempDir;
using ::moepool::testing::TinyModelPath;

using Metadata = std::vector<std::pair<std::string, GgufValue>>;

// Loads a copy of the tiny Q4_K_M model with `edits` applied; `name` names the copy.
absl::StatusOr<std::unique_ptr<Model>> LoadEdited(const std::string& name, const GgufEdits& edits) {
  const std::string& src = TinyModelPath("Q4_K_M");
  if (src.empty()) return absl::InternalError("no tiny model");
  const std::string dst = TempDir() + "/" + name + ".gguf";
  const absl::Status copied = CopyGgufWithEdits(src, dst, edits);
  if (!copied.ok()) return absl::InternalError(absl::StrCat("copy failed: ", copied.message()));
  return Model::Load(dst);
}

GgufEdits DropTensor(const std::string& name) {
  GgufEdits e;
  e.tensor = [name](GgufTensorInfo* t) { return t->name != name; };
  return e;
}

GgufEdits Reshape(const std::string& name, std::vector<int64_t> dims) {
  GgufEdits e;
  e.tensor = [name, dims](GgufTensorInfo* t) {
    if (t->name == name) {
      t->n_dims = static_cast<int>(dims.size());
      for (int i = 0; i < kGgufMaxDims; ++i) t->dims[i] = i < t->n_dims ? dims[i] : 1;
    }
    return true;
  };
  return e;
}

GgufEdits SetKey(const std::string& key, GgufValue value) {
  GgufEdits e;
  e.metadata = [key, value](Metadata* md) {
    for (auto& [k, v] : *md) {
      if (k == key) v = value;
    }
  };
  return e;
}

GgufEdits RemoveKey(const std::string& key) {
  GgufEdits e;
  e.metadata = [key](Metadata* md) {
    std::erase_if(*md, [&](const auto& kv) { return kv.first == key; });
  };
  return e;
}

// The error is INVALID_ARGUMENT (or NOT_FOUND for an absent key) and its message holds every
// one of `parts`.
void ExpectError(const absl::StatusOr<std::unique_ptr<Model>>& m,
                 const std::vector<std::string>& parts) {
  ASSERT_FALSE(m.ok()) << "loaded, expected an error mentioning " << parts[0];
  const absl::StatusCode code = m.status().code();
  EXPECT_TRUE(code == absl::StatusCode::kInvalidArgument || code == absl::StatusCode::kNotFound)
      << m.status();
  for (const std::string& part : parts) {
    EXPECT_NE(m.status().message().find(part), absl::string_view::npos)
        << "'" << part << "' not in: " << m.status();
  }
}

TEST(ModelTest, ReadsTinyHyperparameters) {
  const std::string& path = TinyModelPath("Q4_K_M");
  ASSERT_FALSE(path.empty());
  auto model = Model::Load(path);
  ASSERT_TRUE(model.ok()) << model.status();
  const ModelConfig& c = (*model)->config();
  EXPECT_EQ(c.architecture, "llama");
  EXPECT_EQ(c.n_vocab, 32000);
  EXPECT_EQ(c.n_embd, 256);
  EXPECT_EQ(c.n_layer, 4);
  EXPECT_EQ(c.n_head, 8);
  EXPECT_EQ(c.n_head_kv, 2);
  EXPECT_EQ(c.head_dim, 32);
  EXPECT_EQ(c.kv_dim(), 64);
  EXPECT_EQ(c.n_rot, 32);
  EXPECT_EQ(c.n_ff, 768);
  EXPECT_EQ(c.n_expert, 8);
  EXPECT_EQ(c.n_expert_used, 2);
  EXPECT_EQ(c.n_ctx_train, 4096);
  EXPECT_FLOAT_EQ(c.rope_base, 1e6f);
  EXPECT_FLOAT_EQ(c.rms_eps, 1e-5f);
  EXPECT_FALSE((*model)->per_expert_layout());
  const LayerWeights& L = (*model)->layer(3);
  EXPECT_EQ(L.experts.size(), 8u);
  EXPECT_EQ(L.router.rows, 8);
  EXPECT_EQ(L.experts[7].down.rows, 256);
  EXPECT_EQ(L.experts[7].down.cols, 768);
  // Experts of a merged tensor are consecutive slices.
  EXPECT_EQ(L.experts[1].gate.data, L.experts[0].gate.data + L.experts[0].gate.SizeBytes());
}

TEST(ModelTest, MissingTensorIsNamed) {
  for (const std::string name :
       {"blk.2.attn_k.weight", "blk.1.ffn_up_exps.weight", "blk.3.ffn_gate_inp.weight",
        "output_norm.weight", "token_embd.weight"}) {
    SCOPED_TRACE(name);
    ExpectError(LoadEdited("missing", DropTensor(name)), {"missing tensor", "'" + name + "'"});
  }
}

TEST(ModelTest, MissingOutputHeadMeansTiedEmbeddings) {
  auto m = LoadEdited("tied", DropTensor("output.weight"));
  ASSERT_TRUE(m.ok()) << m.status();
  EXPECT_EQ((*m)->output().data, (*m)->token_embd().data);
}

TEST(ModelTest, WrongShapeNamesTensorAndExpectedShape) {
  struct Case {
    std::string tensor;
    std::vector<int64_t> dims;
    std::string expected;
  };
  const Case cases[] = {
      {"blk.0.attn_q.weight", {256, 128}, "expected [256, 256]"},
      {"blk.1.attn_v.weight", {256, 64, 2}, "expected [256, 64]"},
      {"blk.3.ffn_down_exps.weight", {768, 256, 4}, "expected [768, 256, 8]"},
      {"blk.2.ffn_gate_exps.weight", {256, 512, 8}, "expected [256, 768, 8]"},
      {"blk.0.ffn_norm.weight", {128}, "expected [256]"},
      {"output.weight", {256, 31999}, "expected [256, 32000]"},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.tensor);
    ExpectError(LoadEdited("reshaped", Reshape(c.tensor, c.dims)),
                {"'" + c.tensor + "'", c.expected});
  }
}

TEST(ModelTest, MissingOrZeroHyperparameterIsNamed) {
  for (const std::string key :
       {"llama.embedding_length", "llama.block_count", "llama.attention.head_count",
        "llama.feed_forward_length", "llama.attention.layer_norm_rms_epsilon",
        "llama.context_length", "general.architecture"}) {
    SCOPED_TRACE(key);
    ExpectError(LoadEdited("no-key", RemoveKey(key)), {key});
  }
  for (const std::string key :
       {"llama.embedding_length", "llama.block_count", "llama.attention.head_count",
        "llama.attention.head_count_kv", "llama.feed_forward_length", "llama.expert_count",
        "llama.expert_used_count"}) {
    SCOPED_TRACE(key);
    ExpectError(LoadEdited("zero-key", SetKey(key, GgufValue::Uint32(0))), {key});
  }
  // More experts used than there are.
  ExpectError(LoadEdited("too-many-used", SetKey("llama.expert_used_count", GgufValue::Uint32(9))),
              {"llama.expert_used_count"});
}

TEST(ModelTest, HeadCountMustDivideEmbeddingLength) {
  ExpectError(LoadEdited("heads7", SetKey("llama.attention.head_count", GgufValue::Uint32(7))),
              {"head_count 7", "embedding_length 256"});
  // 8 query heads do not group into 3 KV heads.
  ExpectError(LoadEdited("kv3", SetKey("llama.attention.head_count_kv", GgufValue::Uint32(3))),
              {"head_count_kv 3"});
}

TEST(ModelTest, UnsupportedArchitectureIsNamed) {
  ExpectError(LoadEdited("gpt2", SetKey("general.architecture", GgufValue::String("gpt2"))),
              {"unsupported architecture", "gpt2"});
}

// The per-expert layout holds the same weights as the merged one, so it gives the same bits.
TEST(ModelTest, PerExpertAndMergedLayoutsGiveIdenticalLogits) {
  std::vector<float> logits[2];
  for (bool per_expert : {false, true}) {
    const std::string& path = TinyModelPath("Q4_K_M", 7, per_expert);
    ASSERT_FALSE(path.empty());
    EngineOptions o;
    o.model_path = path;
    o.threads = 2;
    o.n_ctx = 32;
    auto engine = Engine::Load(o);
    ASSERT_TRUE(engine.ok()) << engine.status();
    EXPECT_EQ((*engine)->model().per_expert_layout(), per_expert);
    KvCache cache((*engine)->config(), 32);
    auto out = (*engine)->EvalPrompt(PseudoRandomPrompt(12, 32000, 8), &cache, true);
    ASSERT_TRUE(out.ok()) << out.status();
    logits[per_expert] = std::move(*out);
  }
  ASSERT_EQ(logits[0].size(), 12u * 32000u);
  ASSERT_EQ(logits[1].size(), logits[0].size());
  EXPECT_EQ(std::memcmp(logits[0].data(), logits[1].data(), logits[0].size() * sizeof(float)), 0);
}

TEST(ModelTest, ExpertFilterBindsOnlyChosenExperts) {
  for (bool per_expert : {false, true}) {
    SCOPED_TRACE(per_expert ? "per-expert" : "merged");
    const std::string& path = TinyModelPath("Q4_K_M", 7, per_expert);
    ASSERT_FALSE(path.empty());
    auto full = Model::Load(path);
    ASSERT_TRUE(full.ok()) << full.status();
    const std::set<int> held = {1, 5};
    ExpertFilter filter;
    filter.keep = [&](int, int e) { return held.count(e) > 0; };
    auto part = Model::Load(path, filter);
    ASSERT_TRUE(part.ok()) << part.status();
    EXPECT_EQ((*part)->ExpertBytes() * 4, (*full)->ExpertBytes());
    EXPECT_EQ((*part)->NonExpertBytes(), (*full)->NonExpertBytes());
    for (int layer = 0; layer < 4; ++layer) {
      for (int e = 0; e < 8; ++e) {
        EXPECT_EQ((*part)->layer(layer).experts[e].present(), held.count(e) > 0) << layer << e;
      }
    }

    // One layer's experts only, without the non-expert weights (a worker's share).
    ExpertFilter worker;
    worker.keep = [](int layer, int) { return layer == 2; };
    worker.non_expert = false;
    auto share = Model::Load(path, worker);
    ASSERT_TRUE(share.ok()) << share.status();
    uint64_t layer2_bytes = 0;  // Q4_K_M mixes types per layer: add up layer 2's experts
    for (const ExpertWeights& e : (*full)->layer(2).experts) {
      layer2_bytes += e.gate.SizeBytes() + e.up.SizeBytes() + e.down.SizeBytes();
    }
    EXPECT_EQ((*share)->ExpertBytes(), layer2_bytes);
    EXPECT_LT(layer2_bytes, (*full)->ExpertBytes() / 3);
    EXPECT_EQ((*share)->NonExpertBytes(), 0u);
    EXPECT_EQ((*share)->token_embd().data, nullptr);

    // The backend computes held experts exactly as the full model does and refuses the rest.
    ThreadPool pool(2);
    LocalExpertBackend full_backend(full->get(), &pool), part_backend(part->get(), &pool);
    std::vector<float> x(2 * 256);
    for (size_t i = 0; i < x.size(); ++i) x[i] = static_cast<float>((i * 37) % 17) / 8.0f - 1.0f;
    const int32_t good[] = {1, 5, 5, -1};
    const float weight[] = {0.3f, 0.7f, 1.0f, 0.0f};
    ExpertRoutes routes;
    routes.layer = 3;
    routes.n_rows = 2;
    routes.n_embd = 256;
    routes.k = 2;
    routes.x = x.data();
    routes.expert = good;
    routes.weight = weight;
    std::vector<float> want(2 * 256), got(2 * 256);
    ASSERT_TRUE(full_backend.Compute(routes, want.data()).ok());
    ASSERT_TRUE(part_backend.Compute(routes, got.data()).ok());
    EXPECT_EQ(std::memcmp(want.data(), got.data(), want.size() * sizeof(float)), 0);
    const int32_t bad[] = {1, 5, 0, 5};
    routes.expert = bad;
    const absl::Status s = part_backend.Compute(routes, got.data());
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
    EXPECT_NE(s.message().find("expert 0 of layer 3"), absl::string_view::npos) << s;
  }
}

}  // namespace
}  // namespace moepool
