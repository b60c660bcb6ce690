// Golden replay: on the three demo models and every stream kind, the native
// runtime must make exactly the committed decisions of the Python runtime
// (class and exit stage of every frame). The folder comes from
// SMTM_GOLDEN_DIR (python scripts/golden_traces.py --export_dir=DIR); without
// it the tests are skipped. No tolerance: one differing frame fails.
#include <cstdlib>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "npy.h"
#include "test_files.h"
#include "runtime.h"

namespace smtm {
namespace {

using testing_files::ReadFile;
using testing_files::GoldenDir;
using testing_files::GoldenKinds;

const char* kModels[] = {"demo_resnet", "demo_mobilenet_v2", "demo_vgg"};

class GoldenTest : public ::testing::TestWithParam<const char*> {};

TEST_P(GoldenTest, SameClassAndExitStageOnEveryFrame) {
  if (GoldenDir().empty()) GTEST_SKIP() << "SMTM_GOLDEN_DIR not set";
  std::string name = GetParam();
  std::vector<uint8_t> model = ReadFile(GoldenDir() + "/" + name + ".tflite");
  ASSERT_FALSE(model.empty()) << "no " << name << ".tflite in " << GoldenDir();
  Runtime rt(model.data(), model.size());
  const std::vector<std::string> kinds = GoldenKinds();
  ASSERT_GE(kinds.size(), 7u) << "no stream_kinds.txt in " << GoldenDir();
  for (const std::string& kind : kinds) {
    NpyArray frames = LoadNpy(GoldenDir() + "/" + name + "/" + kind + ".frames.npy");
    NpyArray want = LoadNpy(GoldenDir() + "/" + name + "/" + kind + ".decisions.npy");
    ASSERT_EQ(frames.shape[0], want.shape[0]);
    size_t n = frames.shape[0], size = rt.frame_size();
    rt.Reset();  // Each stream starts with a fresh memory, as in Python.
    size_t differ = 0, exits = 0;
    long first = -1;
    for (size_t i = 0; i < n; ++i) {
      FrameResult r = rt.Classify(frames.f32() + i * size, size);
      const int32_t* w = want.i32() + 2 * i;
      if (r.class_id != w[0] || r.exit_stage != w[1]) {
        if (first < 0) {
          first = static_cast<long>(i);
          ADD_FAILURE() << name << " " << kind << ": frame " << i << " native (" << r.class_id
                        << ", " << r.exit_stage << ") vs Python (" << w[0] << ", " << w[1]
                        << ")";
        }
        ++differ;
      }
      exits += r.exit_stage < rt.num_stages();
    }
    EXPECT_EQ(differ, 0u) << name << " " << kind << ": " << differ << " of " << n
                          << " frames differ, first at " << first;
    EXPECT_GT(exits, 0u) << name << " " << kind << ": no early exit at all";
  }
}

INSTANTIATE_TEST_SUITE_P(DemoModels, GoldenTest, ::testing::ValuesIn(kModels));

}  // namespace
}  // namespace smtm
