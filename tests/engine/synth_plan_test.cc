// PlanSynthTensors describes exactly the tensors SynthesizeModel writes.
#include <memory>
#include <string>
#include <vector>

#include "engine/gguf.h"
#include "engine/synth.h"
#include "gtest/gtest.h"
#include "tests/engine/tiny_model_util.h"

namespace moepool {
namespace {

using ::moepool::testing::TinyModelPath;

TEST(PlanSynthTensorsTest, MatchesTheWrittenFileInBothLayouts) {
  for (const char* type : {"Q4_K_M", "Q3_K_M", "Q8_0"}) {
    for (bool per_expert : {false, true}) {
      const std::string& path = TinyModelPath(type, 7, per_expert);
      ASSERT_FALSE(path.empty());
      auto file = GgufFile::Open(path);
      ASSERT_TRUE(file.ok()) << file.status();
      auto specs = PlanSynthTensors(*SynthShapeByName("tiny"), type, 32000, per_expert);
      ASSERT_TRUE(specs.ok()) << specs.status();
      const std::vector<GgufTensorInfo>& tensors = (*file)->tensors();
      ASSERT_EQ(specs->size(), tensors.size()) << type;
      for (size_t i = 0; i < tensors.size(); ++i) {
        const SynthTensorSpec& s = (*specs)[i];
        const GgufTensorInfo& t = tensors[i];
        EXPECT_EQ(s.name, t.name);
        EXPECT_EQ(s.type, t.type) << t.name << " " << type;
        ASSERT_EQ(static_cast<int>(s.dims.size()), t.n_dims) << t.name;
        for (int d = 0; d < t.n_dims; ++d) EXPECT_EQ(s.dims[d], t.dims[d]) << t.name;
        EXPECT_EQ(s.SizeBytes(), t.size_bytes) << t.name;
      }
    }
  }
}

TEST(PlanSynthTensorsTest, RejectsBadTypesShapesAndRowLengths) {
  const SynthShape tiny = *SynthShapeByName("tiny");
  EXPECT_EQ(PlanSynthTensors(tiny, "Q9_X", 32000, false).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_FALSE(PlanSynthTensors(tiny, "Q4_K_M", 0, false).ok());
  SynthShape odd = tiny;
  odd.n_embd = 96, odd.n_head = 4, odd.n_head_kv = 2;  // rows of 96: not a k-quant block
  auto s = PlanSynthTensors(odd, "Q4_K", 32000, false);
  ASSERT_FALSE(s.ok());
  EXPECT_NE(s.status().message().find("block"), std::string::npos) << s.status();
  odd.n_expert_used = 9;
  EXPECT_FALSE(PlanSynthTensors(odd, "F32", 32000, false).ok());
}

}  // namespace
}  // namespace moepool
