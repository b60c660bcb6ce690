// The native runtime's behaviour beyond the golden decisions: the C API's
// errors, frame errors leaving the memory untouched, state files, and the
// descriptor-against-graph check. Model tests use SMTM_GOLDEN_DIR.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iterator>
#include <memory>
#include <string>
#include <vector>

#include <gtest/gtest.h>
#include <unistd.h>

#include "npy.h"
#include "test_files.h"
#include "runtime.h"
#include "smtm/digest.h"
#include "smtm_runtime.h"

namespace smtm {
namespace {

using testing_files::ReadFile;
using testing_files::GoldenDir;

std::string TempPath(const std::string& name) {
  const char* t = std::getenv("TMPDIR");
  return std::string(t ? t : "/tmp") + "/smtm_rt_" + std::to_string(getpid()) + "_" + name;
}

TEST(CApiTest, NullsAndGarbageAreErrorsNotCrashes) {
  smtm_runtime* rt = nullptr;
  EXPECT_EQ(smtm_create(nullptr, 0, nullptr, &rt), SMTM_ERROR_ARGUMENT);
  EXPECT_NE(std::string(smtm_last_error()).find("model"), std::string::npos);
  std::vector<uint8_t> junk(4096, 0x5a);
  EXPECT_EQ(smtm_create(junk.data(), junk.size(), nullptr, &rt), SMTM_ERROR_MODEL_FILE);
  EXPECT_EQ(rt, nullptr);
  EXPECT_STRNE(smtm_last_error(), "");
  int c, e;
  float pixel = 0;
  EXPECT_EQ(smtm_classify(nullptr, &pixel, 1, &c, &e), SMTM_ERROR_ARGUMENT);
  smtm_options bad = smtm_default_options();
  bad.backend = 7;
  EXPECT_EQ(smtm_create(junk.data(), junk.size(), &bad, &rt), SMTM_ERROR_ARGUMENT);
}

class ModelTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (GoldenDir().empty()) GTEST_SKIP() << "SMTM_GOLDEN_DIR not set";
    model_ = ReadFile(GoldenDir() + "/demo_resnet.tflite");
    ASSERT_FALSE(model_.empty());
    frames_ = LoadNpy(GoldenDir() + "/demo_resnet/video.frames.npy");
  }
  const float* Frame(size_t i) const { return frames_.f32() + i * Size(); }
  size_t Size() const { return frames_.size() / frames_.shape[0]; }
  std::vector<uint8_t> model_;
  NpyArray frames_;
};

TEST_F(ModelTest, PlainTfliteAndDamagedWeightsAreModelFileErrors) {
  std::vector<uint8_t> damaged = model_;
  damaged[damaged.size() / 2] ^= 0x40;  // Inside the weights: the digest no longer matches.
  try {
    Runtime rt(damaged.data(), damaged.size());
    FAIL() << "a damaged model loaded";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), Error::Code::kModelFile);
    EXPECT_NE(std::string(e.what()).find("damaged"), std::string::npos) << e.what();
  }
  std::vector<uint8_t> cut(model_.begin(), model_.begin() + model_.size() / 3);
  EXPECT_THROW(Runtime(cut.data(), cut.size()), Error);
}

TEST_F(ModelTest, BadFramesAreRefusedAndLeaveTheMemory) {
  smtm_runtime* rt = nullptr;
  ASSERT_EQ(smtm_create(model_.data(), model_.size(), nullptr, &rt), SMTM_OK) << smtm_last_error();
  ASSERT_EQ(smtm_frame_size(rt), Size());
  int c, e;
  for (size_t i = 0; i < 40; ++i) ASSERT_EQ(smtm_classify(rt, Frame(i), Size(), &c, &e), SMTM_OK);
  smtm_counters before{}, after{};
  smtm_counters_get(rt, &before);
  std::vector<float> nan_frame(Frame(40), Frame(40) + Size());
  nan_frame[3] = std::nanf("");
  nan_frame[9] = INFINITY;
  EXPECT_EQ(smtm_classify(rt, nan_frame.data(), Size(), &c, &e), SMTM_ERROR_FRAME);
  EXPECT_NE(std::string(smtm_last_error()).find("2 non-finite"), std::string::npos)
      << smtm_last_error();
  EXPECT_EQ(smtm_classify(rt, Frame(40), Size() - 1, &c, &e), SMTM_ERROR_ARGUMENT);
  EXPECT_EQ(smtm_classify_full(rt, nan_frame.data(), Size(), &c), SMTM_ERROR_FRAME);
  smtm_counters_get(rt, &after);
  EXPECT_EQ(before.exits, after.exits);
  EXPECT_EQ(before.checks, after.checks);
  // The stream goes on as if the bad frames never came: same decisions as a
  // runtime that never saw them.
  smtm_runtime* twin = nullptr;
  ASSERT_EQ(smtm_create(model_.data(), model_.size(), nullptr, &twin), SMTM_OK);
  for (size_t i = 0; i < 40; ++i) smtm_classify(twin, Frame(i), Size(), &c, &e);
  for (size_t i = 40; i < 120; ++i) {
    int c1, e1, c2, e2;
    ASSERT_EQ(smtm_classify(rt, Frame(i), Size(), &c1, &e1), SMTM_OK);
    ASSERT_EQ(smtm_classify(twin, Frame(i), Size(), &c2, &e2), SMTM_OK);
    ASSERT_EQ(c1, c2) << i;
    ASSERT_EQ(e1, e2) << i;
  }
  smtm_destroy(twin);
  smtm_destroy(rt);
}

TEST_F(ModelTest, ExitRulesThatDoNotFitAreRefusedAndTheRuleStays) {
  smtm_runtime* rt = nullptr;
  ASSERT_EQ(smtm_create(model_.data(), model_.size(), nullptr, &rt), SMTM_OK) << smtm_last_error();
  const int S = smtm_num_stages(rt);
  auto thresholds = [&](int n) {
    std::string t = "[";
    for (int s = 0; s < n; ++s) t += (s ? ",2.5" : "2.5");
    return t + "]";
  };
  auto params = [&](int classes) {
    std::string p = "[";
    for (int s = 0; s < S; ++s) {
      p += s ? ",[" : "[";
      for (int c = 0; c < classes; ++c) p += c ? ",[0.0,1.0]" : "[0.0,1.0]";
      p += "]";
    }
    return p + "]";
  };
  const std::string margin = "{\"exit_rule\":{\"metric\":\"margin\",\"thresholds\":";
  const struct { std::string json, says; } bad[] = {
      {"not json", "not valid JSON"},
      {"[1, 2]", "must be a JSON object"},
      {"{\"cache\":null}", "exit_rule"},
      {"{\"exit_rule\":{},\"extra\":1}", "extra"},
      {margin + thresholds(S - 1) + ",\"target_agreement\":0.99},\"cache\":null}", "stages"},
      {margin + thresholds(S) + "},\"cache\":null}", "target_agreement"},  // Required.
      {margin + thresholds(S) + ",\"target_agreement\":7},\"cache\":null}", "target_agreement"},
      {margin + "[NaN]},\"cache\":null}", "not valid JSON"},
      {margin + thresholds(S) + ",\"target_agreement\":0.99,\"cold_thresholds\":" +
           thresholds(S) + "},\"cache\":null}",
       "cache policy"},
      {"{\"exit_rule\":{\"metric\":\"layer_aware\",\"thresholds\":" + thresholds(S) +
           ",\"target_agreement\":0.99,\"metric_params\":" + params(3) + "},\"cache\":null}",
       "covers 3 classes"},
  };
  int c, e;
  std::vector<std::pair<int, int>> before, after;
  for (size_t i = 0; i < 60; ++i) {
    ASSERT_EQ(smtm_classify(rt, Frame(i), Size(), &c, &e), SMTM_OK);
    before.emplace_back(c, e);
  }
  ASSERT_EQ(smtm_reset(rt), SMTM_OK);
  for (const auto& b : bad) {
    EXPECT_EQ(smtm_set_exit_rule(rt, b.json.c_str()), SMTM_ERROR_ARGUMENT) << b.json;
    EXPECT_NE(std::string(smtm_last_error()).find(b.says), std::string::npos)
        << b.json << ": " << smtm_last_error();
  }
  EXPECT_EQ(smtm_set_exit_rule(rt, nullptr), SMTM_ERROR_ARGUMENT);
  // The descriptor's rule stays: the same decisions as before.
  for (size_t i = 0; i < 60; ++i) {
    ASSERT_EQ(smtm_classify(rt, Frame(i), Size(), &c, &e), SMTM_OK);
    after.emplace_back(c, e);
  }
  EXPECT_EQ(before, after);
  // A rule that fits is taken: margin >= 1e9 never exits early.
  std::string never = margin + "[";
  for (int s = 0; s < S; ++s) never += s ? ",1e9" : "1e9";
  never += "],\"target_agreement\":0.99},\"cache\":null}";
  ASSERT_EQ(smtm_set_exit_rule(rt, never.c_str()), SMTM_OK)
      << smtm_last_error();
  for (size_t i = 0; i < 20; ++i) {
    ASSERT_EQ(smtm_classify(rt, Frame(i), Size(), &c, &e), SMTM_OK);
    EXPECT_EQ(e, S) << i;
  }
  smtm_destroy(rt);
}

TEST_F(ModelTest, StateSaveLoadContinuesTheStream) {
  std::string path = TempPath("state.npz");
  Runtime a(model_.data(), model_.size());
  size_t n = frames_.shape[0], half = n / 2;
  for (size_t i = 0; i < half; ++i) a.Classify(Frame(i), Size());
  a.SaveState(path);
  Runtime b(model_.data(), model_.size());
  std::string why;
  ASSERT_TRUE(b.LoadState(path, &why)) << why;
  for (size_t i = half; i < n; ++i) {
    FrameResult ra = a.Classify(Frame(i), Size()), rb = b.Classify(Frame(i), Size());
    ASSERT_EQ(ra.class_id, rb.class_id) << i;
    ASSERT_EQ(ra.exit_stage, rb.exit_stage) << i;
  }
  // A damaged file is refused with a reason and leaves a fresh memory.
  std::vector<uint8_t> bytes = ReadFile(path);
  bytes.resize(bytes.size() / 2);
  std::ofstream(path, std::ios::binary).write(reinterpret_cast<const char*>(bytes.data()),
                                              bytes.size());
  EXPECT_FALSE(b.LoadState(path, &why));
  EXPECT_FALSE(why.empty());
  EXPECT_EQ(b.memory().exits(), 0);
  std::remove(path.c_str());
  EXPECT_FALSE(b.LoadState(path, &why));  // Missing.
}

TEST_F(ModelTest, FingerprintIsTheDescriptorsSha256) {
  Runtime rt(model_.data(), model_.size());
  std::optional<std::string> raw = ReadMetadata(model_.data(), model_.size(), "smtm_descriptor");
  ASSERT_TRUE(raw.has_value());
  EXPECT_EQ(rt.fingerprint(), Sha256Hex(raw->data(), raw->size()));
}

TEST_F(ModelTest, DescriptorMustMatchTheGraph) {
  std::optional<std::string> raw = ReadMetadata(model_.data(), model_.size(), "smtm_descriptor");
  ASSERT_TRUE(raw.has_value());
  Descriptor d = Descriptor::Parse(*raw);
  litert::Session session(model_.data(), model_.size(), {});
  std::vector<litert::SignatureInfo> graph = session.signatures();
  EXPECT_NO_THROW(CheckAgainstGraph(d, graph));

  auto expect_refused = [&](std::vector<litert::SignatureInfo> g, const std::string& says) {
    try {
      CheckAgainstGraph(d, g);
      ADD_FAILURE() << "accepted; wanted: " << says;
    } catch (const Error& e) {
      EXPECT_EQ(e.code(), Error::Code::kModelFile);
      EXPECT_NE(std::string(e.what()).find(says), std::string::npos) << e.what();
    }
  };
  auto extra = graph;
  extra.push_back(graph[0]);
  extra.back().key = "stage_9";
  expect_refused(extra, "The model's signatures are");
  auto missing = graph;
  for (size_t i = 0; i < missing.size(); ++i) {
    if (missing[i].key == "full") missing.erase(missing.begin() + i);
  }
  expect_refused(missing, "its descriptor names");
  auto reshaped = graph;
  for (auto& s : reshaped) {
    if (s.key == "head") s.outputs[0].shape.push_back(1);
  }
  expect_refused(reshaped, "head.outputs: the descriptor lists");
  auto retyped = graph;
  for (auto& s : retyped) {
    if (s.key == d.stages[0].signature.key) s.inputs[0].dtype = "int8";
  }
  expect_refused(retyped, "stages[0].signature.inputs");
}

}  // namespace
}  // namespace smtm

namespace smtm {
namespace {

// The GPU at float32 precision must decide as the CPU does (the golden
// decisions, which the CPU reproduces): every op on the GPU, every frame of
// each demo model's video stream. Skipped where no GPU or Vulkan driver can
// run LiteRT's WebGPU accelerator. (At float16 precision a few exit stages
// differ; docs/native_runtime.md has the measured counts.)
class GpuTest : public ::testing::TestWithParam<const char*> {};

TEST_P(GpuTest, Fp32DecidesAsTheCpu) {
  if (GoldenDir().empty()) GTEST_SKIP() << "SMTM_GOLDEN_DIR not set";
  const std::string name = GetParam();
  std::vector<uint8_t> model = ReadFile(GoldenDir() + "/" + name + ".tflite");
  ASSERT_FALSE(model.empty()) << name;
  RuntimeOptions gpu;
  gpu.accelerator = litert::Accelerator::kGpuFp32;
  std::unique_ptr<Runtime> rt;
  try {
    rt = std::make_unique<Runtime>(model.data(), model.size(), gpu);
  } catch (const Error& e) {
    ASSERT_EQ(e.code(), Error::Code::kBackend) << e.what();
    GTEST_SKIP() << "no GPU here: " << e.what();
  }
  EXPECT_TRUE(rt->fully_accelerated());
  NpyArray frames = LoadNpy(GoldenDir() + "/" + name + "/video.frames.npy");
  NpyArray want = LoadNpy(GoldenDir() + "/" + name + "/video.decisions.npy");
  size_t size = rt->frame_size(), n = frames.size() / size;
  ASSERT_EQ(want.size(), 2 * n);
  for (size_t i = 0; i < n; ++i) {
    FrameResult r = rt->Classify(frames.f32() + i * size, size);
    ASSERT_EQ(r.class_id, want.i32()[2 * i]) << name << " frame " << i;
    ASSERT_EQ(r.exit_stage, want.i32()[2 * i + 1]) << name << " frame " << i;
  }
}

INSTANTIATE_TEST_SUITE_P(DemoModels, GpuTest,
                         ::testing::Values("demo_vgg", "demo_resnet", "demo_mobilenet_v2"));

}  // namespace
}  // namespace smtm
