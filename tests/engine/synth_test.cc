#include "engine/synth.h"

#include <cmath>
#include <cstring>
#include <map>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "engine/gguf.h"
#include "engine/quant/fp16.h"
#include "gtest/gtest.h"
#include "tests/testdata.h"

namespace moepool {
namespace {

using ::moepool::testing::ReadFileOrDie;
using ::moepool::testing::SharedTestdataPath;
using ::moepool::testing::TempDir;

std::string VocabPath() { return std::string(MOEPOOL_SOURCE_DIR) + "/" + kDefaultSynthVocabPath; }

SynthOptions TinyOptions(const std::string& type, uint64_t seed, bool per_expert,
                         const std::string& file) {
  SynthOptions o;
  o.shape = *SynthShapeByName("tiny");
  o.type = type;
  o.seed = seed;
  o.vocab_path = VocabPath();
  o.per_expert_layout = per_expert;
  o.out_path = TempDir() + "/" + file;
  return o;
}

// Synthesizes once per (type, seed, layout) and process.
const std::string& Synthesized(const std::string& type, uint64_t seed, bool per_expert) {
  static auto* cache = new std::map<std::string, std::string>;
  const std::string file =
      absl::StrCat("synth-", type, "-", seed, per_expert ? "-split" : "", ".gguf");
  auto it = cache->find(file);
  if (it != cache->end()) return it->second;
  const SynthOptions o = TinyOptions(type, seed, per_expert, file);
  const absl::Status s = SynthesizeModel(o);
  EXPECT_TRUE(s.ok()) << s;
  return cache->emplace(file, o.out_path).first->second;
}

struct Moments {
  double mean = 0, stddev = 0;
};

Moments F16Moments(const GgufTensorInfo& t) {
  EXPECT_EQ(t.type, TensorType::kF16) << t.name;
  const auto* h = reinterpret_cast<const uint16_t*>(t.data);
  const int64_t n = t.NumElements();
  double sum = 0, sq = 0;
  for (int64_t i = 0; i < n; ++i) {
    const double v = Fp16ToFp32(h[i]);
    sum += v;
    sq += v * v;
  }
  Moments m;
  m.mean = sum / n;
  m.stddev = std::sqrt(sq / n - m.mean * m.mean);
  return m;
}

TEST(SynthTest, TinyF16HasMixtralTensorsAndMetadata) {
  auto file = GgufFile::Open(Synthesized("F16", 11, false));
  ASSERT_TRUE(file.ok()) << file.status();
  const GgufFile& f = **file;
  EXPECT_EQ(*f.GetString("general.architecture"), "llama");
  EXPECT_EQ(*f.GetUint("llama.context_length"), 4096u);
  EXPECT_EQ(*f.GetUint("llama.embedding_length"), 256u);
  EXPECT_EQ(*f.GetUint("llama.block_count"), 4u);
  EXPECT_EQ(*f.GetUint("llama.feed_forward_length"), 768u);
  EXPECT_EQ(*f.GetUint("llama.attention.head_count"), 8u);
  EXPECT_EQ(*f.GetUint("llama.attention.head_count_kv"), 2u);
  EXPECT_EQ(*f.GetUint("llama.rope.dimension_count"), 32u);
  EXPECT_DOUBLE_EQ(*f.GetFloat("llama.rope.freq_base"), 1e6);
  EXPECT_FLOAT_EQ(static_cast<float>(*f.GetFloat("llama.attention.layer_norm_rms_epsilon")), 1e-5f);
  EXPECT_EQ(*f.GetUint("llama.expert_count"), 8u);
  EXPECT_EQ(*f.GetUint("llama.expert_used_count"), 2u);
  EXPECT_EQ(*f.GetUint("general.file_type"), 1u);
  EXPECT_EQ(*f.GetString("tokenizer.ggml.model"), "llama");
  EXPECT_EQ(f.GetStringArray("tokenizer.ggml.tokens")->size(), 32000u);
  EXPECT_EQ(f.GetFloatArray("tokenizer.ggml.scores")->size(), 32000u);
  EXPECT_EQ(*f.GetUint("tokenizer.ggml.bos_token_id"), 1u);
  EXPECT_TRUE(*f.GetBool("tokenizer.ggml.add_bos_token"));

  ASSERT_EQ(f.tensors().size(), 3u + 4u * 10u);
  auto expect = [&](const std::string& name, TensorType type, std::vector<int64_t> dims) {
    const GgufTensorInfo* t = f.FindTensor(name);
    ASSERT_NE(t, nullptr) << name;
    EXPECT_EQ(t->type, type) << name;
    EXPECT_EQ(std::vector<int64_t>(t->dims, t->dims + t->n_dims), dims) << name;
  };
  expect("token_embd.weight", TensorType::kF16, {256, 32000});
  expect("output_norm.weight", TensorType::kF32, {256});
  expect("output.weight", TensorType::kF16, {256, 32000});
  for (int l = 0; l < 4; ++l) {
    const std::string b = absl::StrCat("blk.", l, ".");
    expect(b + "attn_norm.weight", TensorType::kF32, {256});
    expect(b + "attn_q.weight", TensorType::kF16, {256, 256});
    expect(b + "attn_k.weight", TensorType::kF16, {256, 64});
    expect(b + "attn_v.weight", TensorType::kF16, {256, 64});
    expect(b + "attn_output.weight", TensorType::kF16, {256, 256});
    expect(b + "ffn_norm.weight", TensorType::kF32, {256});
    expect(b + "ffn_gate_inp.weight", TensorType::kF32, {256, 8});
    expect(b + "ffn_gate_exps.weight", TensorType::kF16, {256, 768, 8});
    expect(b + "ffn_up_exps.weight", TensorType::kF16, {256, 768, 8});
    expect(b + "ffn_down_exps.weight", TensorType::kF16, {768, 256, 8});
  }
}

// The layout, metadata keys and weight scales match the reference tiny model.
TEST(SynthTest, TinyF16MatchesReferenceLayoutAndScales) {
  const std::string ref_path = SharedTestdataPath("conformance/tiny-F16.gguf");
  REQUIRE_TESTDATA(ref_path);
  auto ref = GgufFile::Open(ref_path);
  ASSERT_TRUE(ref.ok()) << ref.status();
  auto syn = GgufFile::Open(Synthesized("F16", 11, false));
  ASSERT_TRUE(syn.ok()) << syn.status();
  for (const auto& [key, value] : (*ref)->metadata()) {
    if (key == "general.name" || key == "tokenizer.chat_template") continue;
    const GgufValue* mine = (*syn)->Find(key);
    ASSERT_NE(mine, nullptr) << key;
    EXPECT_EQ(mine->type, value.type) << key;
    if (value.type != GgufValueType::kArray) {
      EXPECT_EQ(mine->AsDouble(), value.AsDouble()) << key;
      EXPECT_EQ(mine->string_value, value.string_value) << key;
    } else {
      EXPECT_EQ(mine->array_type, value.array_type) << key;
      EXPECT_EQ(mine->ArraySize(), value.ArraySize()) << key;
    }
  }
  ASSERT_EQ((*syn)->tensors().size(), (*ref)->tensors().size());
  for (size_t i = 0; i < (*ref)->tensors().size(); ++i) {
    const GgufTensorInfo& r = (*ref)->tensors()[i];
    const GgufTensorInfo& s = (*syn)->tensors()[i];
    EXPECT_EQ(s.name, r.name);
    EXPECT_EQ(s.type, r.type) << r.name;
    EXPECT_EQ(s.ShapeString(), r.ShapeString()) << r.name;
    if (r.type != TensorType::kF16 || r.name.find("blk.1") == 0 || r.name.find("blk.2") == 0) {
      continue;
    }
    const Moments rm = F16Moments(r), sm = F16Moments(s);
    EXPECT_NEAR(sm.stddev, rm.stddev, 0.03 * rm.stddev) << r.name;
    EXPECT_NEAR(sm.mean, rm.mean, 0.03 * rm.stddev) << r.name;
  }
  // Norms are centred on 1.
  const GgufTensorInfo* norm = (*syn)->FindTensor("blk.0.attn_norm.weight");
  ASSERT_NE(norm, nullptr);
  const auto* v = reinterpret_cast<const float*>(norm->data);
  double sum = 0;
  for (int i = 0; i < 256; ++i) sum += v[i];
  EXPECT_NEAR(sum / 256, 1.0, 0.03);
}

TEST(SynthTest, SameSeedGivesIdenticalBytesOtherSeedDoesNot) {
  const std::string a = ReadFileOrDie(Synthesized("F16", 5, false));
  const SynthOptions again = TinyOptions("f16", 5, false, "synth-again.gguf");
  ASSERT_TRUE(SynthesizeModel(again).ok());
  const std::string b = ReadFileOrDie(again.out_path);
  const std::string c = ReadFileOrDie(Synthesized("F16", 6, false));
  ASSERT_FALSE(a.empty());
  EXPECT_TRUE(a == b);
  ASSERT_EQ(a.size(), c.size());
  // Only general.name and the weights differ: compare the last megabyte.
  EXPECT_NE(a.substr(a.size() - (1 << 20)), c.substr(c.size() - (1 << 20)));
}

// --router-skew: expert e's router row shares a component with e ^ m (m = 4 + layer % 4 for 8
// experts), so those rows point the same way; the unskewed router is not touched by the option.
TEST(SynthTest, RouterSkewCorrelatesPartnerRows) {
  SynthOptions skewed = TinyOptions("Q8_0", 5, false, "synth-skew.gguf");
  skewed.router_skew = 1.0f;
  ASSERT_TRUE(SynthesizeModel(skewed).ok());
  SynthOptions plain = TinyOptions("Q8_0", 5, false, "synth-noskew.gguf");
  ASSERT_TRUE(SynthesizeModel(plain).ok());
  auto f = GgufFile::Open(skewed.out_path);
  auto g = GgufFile::Open(plain.out_path);
  ASSERT_TRUE(f.ok() && g.ok());
  const GgufTensorInfo* router = (*f)->FindTensor("blk.1.ffn_gate_inp.weight");
  const GgufTensorInfo* same = (*f)->FindTensor("blk.1.attn_q.weight");
  ASSERT_NE(router, nullptr);
  const int64_t n = router->dims[0], n_expert = router->dims[1];
  const auto* w = reinterpret_cast<const float*>(router->data);
  auto cosine = [&](int64_t a, int64_t b) {
    double ab = 0, aa = 0, bb = 0;
    for (int64_t i = 0; i < n; ++i) {
      ab += w[a * n + i] * w[b * n + i];
      aa += w[a * n + i] * w[a * n + i];
      bb += w[b * n + i] * w[b * n + i];
    }
    return ab / std::sqrt(aa * bb);
  };
  const int64_t m = n_expert / 2 + 1 % (n_expert / 2);  // layer 1
  for (int64_t e = 0; e < n_expert; ++e) {
    EXPECT_GT(cosine(e, e ^ m), 0.5) << "expert " << e;
    for (int64_t o = 0; o < n_expert; ++o) {
      if (o != e && o != (e ^ m)) {
        EXPECT_LT(std::abs(cosine(e, o)), 0.3) << e << " " << o;
      }
    }
  }
  // Other tensors are the same bytes as without the option.
  const GgufTensorInfo* plain_same = (*g)->FindTensor("blk.1.attn_q.weight");
  ASSERT_NE(same, nullptr);
  ASSERT_NE(plain_same, nullptr);
  EXPECT_EQ(std::memcmp(same->data, plain_same->data, same->size_bytes), 0);
  SynthOptions bad = plain;
  bad.router_skew = 1.5f;
  EXPECT_EQ(SynthesizeModel(bad).code(), absl::StatusCode::kInvalidArgument);
}

TEST(SynthTest, MergedAndPerExpertLayoutsHoldTheSameWeights) {
  auto merged = GgufFile::Open(Synthesized("F16", 3, false));
  auto split = GgufFile::Open(Synthesized("F16", 3, true));
  ASSERT_TRUE(merged.ok()) << merged.status();
  ASSERT_TRUE(split.ok()) << split.status();
  const GgufFile& m = **merged;
  const GgufFile& s = **split;
  EXPECT_EQ(s.tensors().size(), 3u + 4u * (7u + 3u * 8u));
  EXPECT_EQ(s.FindTensor("blk.0.ffn_gate_exps.weight"), nullptr);
  for (const GgufTensorInfo& t : m.tensors()) {
    if (t.n_dims != 3) {
      const GgufTensorInfo* same = s.FindTensor(t.name);
      ASSERT_NE(same, nullptr) << t.name;
      ASSERT_EQ(same->size_bytes, t.size_bytes);
      EXPECT_EQ(std::memcmp(same->data, t.data, t.size_bytes), 0) << t.name;
      continue;
    }
    // blk.N.ffn_KIND_exps.weight <-> blk.N.ffn_KIND.E.weight
    const std::string prefix = t.name.substr(0, t.name.find("_exps"));
    const size_t slice = t.size_bytes / 8;
    for (int e = 0; e < 8; ++e) {
      const std::string name = absl::StrCat(prefix, ".", e, ".weight");
      const GgufTensorInfo* x = s.FindTensor(name);
      ASSERT_NE(x, nullptr) << name;
      EXPECT_EQ(x->n_dims, 2);
      EXPECT_EQ(x->dims[0], t.dims[0]);
      EXPECT_EQ(x->dims[1], t.dims[1]);
      ASSERT_EQ(x->size_bytes, slice);
      EXPECT_EQ(std::memcmp(x->data, t.data + e * slice, slice), 0) << name;
    }
  }
  // Experts differ from one another.
  const GgufTensorInfo* g0 = s.FindTensor("blk.0.ffn_gate.0.weight");
  const GgufTensorInfo* g1 = s.FindTensor("blk.0.ffn_gate.1.weight");
  ASSERT_TRUE(g0 && g1);
  EXPECT_NE(std::memcmp(g0->data, g1->data, g0->size_bytes), 0);
}

// The Q4_K_M mix picks the same type per tensor as the reference quantizer did for tiny.
TEST(SynthTest, Q4KMMixMatchesReferenceTensorTypes) {
  const std::string ref_path = SharedTestdataPath("conformance/tiny-Q4_K_M.gguf");
  REQUIRE_TESTDATA(ref_path);
  auto ref = GgufFile::Open(ref_path);
  ASSERT_TRUE(ref.ok()) << ref.status();
  auto syn = GgufFile::Open(Synthesized("Q4_K_M", 1, false));
  ASSERT_TRUE(syn.ok()) << syn.status();
  EXPECT_EQ(*(*syn)->GetUint("general.file_type"), *(*ref)->GetUint("general.file_type"));
  for (const GgufTensorInfo& r : (*ref)->tensors()) {
    const GgufTensorInfo* s = (*syn)->FindTensor(r.name);
    ASSERT_NE(s, nullptr) << r.name;
    EXPECT_EQ(s->type, r.type) << r.name;
    EXPECT_EQ(s->size_bytes, r.size_bytes) << r.name;
  }
}

// A quantized model holds the same underlying weights as the F16 model of the same seed.
TEST(SynthTest, QuantizedWeightsApproximateTheF16Weights) {
  auto quant = GgufFile::Open(Synthesized("Q4_K_M", 1, false));
  auto f16 = GgufFile::Open(Synthesized("F16", 1, false));
  ASSERT_TRUE(quant.ok()) << quant.status();
  ASSERT_TRUE(f16.ok()) << f16.status();
  for (const char* name : {"blk.0.attn_q.weight", "blk.3.ffn_down_exps.weight", "output.weight"}) {
    const GgufTensorInfo* q = (*quant)->FindTensor(name);
    const GgufTensorInfo* h = (*f16)->FindTensor(name);
    ASSERT_TRUE(q && h) << name;
    ASSERT_NE(q->type, TensorType::kF16);
    const int64_t n = h->NumElements();
    std::vector<float> deq(n);
    const TypeTraits& tr = GetTypeTraits(q->type);
    const size_t row_bytes = RowBytes(q->type, q->dims[0]);
    for (int64_t r = 0; r < q->NumRows(); ++r) {
      tr.dequantize(q->data + r * row_bytes, deq.data() + r * q->dims[0], q->dims[0]);
    }
    const auto* ref = reinterpret_cast<const uint16_t*>(h->data);
    double err = 0, norm = 0;
    for (int64_t i = 0; i < n; ++i) {
      const double want = Fp16ToFp32(ref[i]);
      err += (deq[i] - want) * (deq[i] - want);
      norm += want * want;
    }
    EXPECT_LT(err / norm, 0.01) << name << " (" << tr.name << ")";
  }
}

TEST(SynthTest, ReportsProgressPerTensor) {
  SynthOptions o = TinyOptions("F32", 1, false, "progress.gguf");
  o.shape.n_layer = 1;
  std::vector<std::pair<int, int>> calls;
  ASSERT_TRUE(
      SynthesizeModel(o, [&](int done, int total) { calls.emplace_back(done, total); }).ok());
  ASSERT_EQ(calls.size(), 3u + 10u + 1u);
  EXPECT_EQ(calls.front(), std::make_pair(0, 13));
  EXPECT_EQ(calls.back(), std::make_pair(13, 13));
}

TEST(SynthTest, BadOptionsAreErrors) {
  EXPECT_EQ(SynthShapeByName("huge").status().code(), absl::StatusCode::kNotFound);
  EXPECT_TRUE(SynthShapeByName("mini").ok());
  EXPECT_EQ(SynthShapeByName("mixtral-8x7b")->n_layer, 32);

  SynthOptions o = TinyOptions("Q4_K_X", 1, false, "bad.gguf");
  EXPECT_EQ(SynthesizeModel(o).code(), absl::StatusCode::kInvalidArgument);
  o = TinyOptions("F16", 1, false, "bad.gguf");
  o.vocab_path = "/nonexistent/vocab.gguf";
  EXPECT_FALSE(SynthesizeModel(o).ok());
  o = TinyOptions("F16", 1, false, "bad.gguf");
  o.out_path = "/nonexistent-dir/model.gguf";
  EXPECT_FALSE(SynthesizeModel(o).ok());
  o = TinyOptions("Q4_K", 1, false, "bad.gguf");
  o.shape.n_embd = 384;  // not a multiple of the 256-element k-quant block
  o.shape.n_head = 6;
  o.shape.n_head_kv = 2;
  EXPECT_EQ(SynthesizeModel(o).code(), absl::StatusCode::kInvalidArgument);
  o.shape.n_head_kv = 4;  // 6 heads do not group into 4
  EXPECT_EQ(SynthesizeModel(o).code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace moepool
