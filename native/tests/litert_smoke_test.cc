// LiteRT glue: the library loads, a converted demo model compiles on the CPU,
// its signatures are listed with the descriptor's tensors, and its `full`
// signature returns the probabilities the Python runtime computed.
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <fstream>
#include <iterator>
#include <string>

#include <gtest/gtest.h>

#include "npy.h"
#include "test_files.h"
#include "session.h"
#include "smtm/error.h"

namespace smtm {
namespace {

using testing_files::ReadFile;
using testing_files::GoldenDir;

TEST(LiteRtTest, LibraryHasCpuAccelerator) {
  std::string line = litert::CheckLibrary();
  EXPECT_NE(line.find("2.3.0"), std::string::npos) << line;
}

TEST(LiteRtTest, GarbageIsAModelFileError) {
  std::vector<uint8_t> junk(64, 7);
  try {
    litert::Session s(junk.data(), junk.size(), {});
    FAIL() << "garbage loaded";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), Error::Code::kModelFile) << e.what();
  }
}

TEST(LiteRtTest, FullSignatureMatchesPython) {
  if (GoldenDir().empty()) GTEST_SKIP() << "SMTM_GOLDEN_DIR not set";
  for (const char* name : {"demo_resnet", "demo_mobilenet_v2", "demo_vgg"}) {
    SCOPED_TRACE(name);
    std::vector<uint8_t> model = ReadFile(GoldenDir() + "/" + name + ".tflite");
    ASSERT_FALSE(model.empty());
    litert::Session session(model.data(), model.size(), {});
    ASSERT_TRUE(session.Metadata("smtm_descriptor").has_value());
    EXPECT_FALSE(session.Metadata("no such entry").has_value());
    int full = session.SignatureIndex("full");
    ASSERT_GE(full, 0);
    const auto& info = session.signatures()[full];
    ASSERT_EQ(info.inputs.size(), 1u);
    EXPECT_EQ(info.inputs[0].name, "image");
    EXPECT_EQ(info.inputs[0].dtype, "float32");
    NpyArray frames = LoadNpy(GoldenDir() + "/" + name + "/video.frames.npy");
    NpyArray want = LoadNpy(GoldenDir() + "/" + name + "/full_probabilities.npy");
    size_t pixels = info.inputs[0].bytes / sizeof(float);
    ASSERT_EQ(info.outputs.size(), 1u);
    size_t classes = info.outputs[0].bytes / sizeof(float);
    ASSERT_EQ(want.shape.size(), 2u);
    ASSERT_EQ(static_cast<size_t>(want.shape[1]), classes);
    ASSERT_GT(want.shape[0], 0);
    ASSERT_EQ(pixels, frames.size() / frames.shape[0]);
    // Demo models take pixels as they are (identity preprocessing), so the
    // frames go in unchanged.
    float worst = 0;
    for (int64_t f = 0; f < want.shape[0]; ++f) {
      std::copy_n(frames.f32() + f * pixels, pixels, session.Input(full, "image"));
      session.Run(full);
      const float* got = session.Output(full, "probabilities");
      for (size_t c = 0; c < classes; ++c) {
        worst = std::max(worst, std::fabs(got[c] - want.f32()[f * classes + c]));
      }
    }
    // Python's interpreter and this compiled model run the same library's
    // XNNPACK kernels on one thread: the probabilities are bit-identical.
    EXPECT_EQ(worst, 0.0f);
    std::printf("%s: max |p_native - p_python| = %.3g over %lld frames\n", name, worst,
                static_cast<long long>(want.shape[0]));
  }
}

}  // namespace
}  // namespace smtm
