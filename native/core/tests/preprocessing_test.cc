#include <cmath>
#include <limits>
#include <vector>

#include <gtest/gtest.h>

#include "smtm/error.h"
#include "smtm/preprocessing.h"

namespace smtm {
namespace {

TEST(PreprocessingTest, RoundsAfterTheMultiplyAndAfterTheAdd) {
  Preprocessing p;
  p.scale = {1.0 / 58.395, 1.0 / 57.12, 1.0 / 57.375};
  p.offset = {-123.675 / 58.395, -116.28 / 57.12, -103.53 / 57.375};
  std::vector<float> scale, offset;
  p.Arrays(3, &scale, &offset);
  std::vector<float> pixels;
  for (int i = 0; i < 256 * 3; ++i) pixels.push_back(float(i % 256) + 0.25f * float(i % 3));
  std::vector<float> out(pixels.size());
  Preprocess(pixels.data(), out.data(), pixels.size(), scale.data(), offset.data(), 3);
  for (size_t i = 0; i < pixels.size(); ++i) {
    // numpy: multiply(frame, scale) then add(dst, offset), each rounded to float32.
    volatile float product = pixels[i] * scale[i % 3];
    float want = product + offset[i % 3];
    ASSERT_EQ(out[i], want) << i;
  }
}

TEST(PreprocessingTest, EveryChannelCountSizeAndInPlaceRoundAsNumpy) {
  // The vectorised blocks (1-4 channels, 8 pixels each), the pixels after
  // the last whole block, the generic loop (5 channels) and in place.
  for (int channels = 1; channels <= 5; ++channels) {
    std::vector<float> scale, offset;
    for (int c = 0; c < channels; ++c) {
      scale.push_back(1.0f / (57.0f + float(c)));
      offset.push_back(-1.75f + 0.3f * float(c));
    }
    for (size_t pixels_n : {1u, 7u, 8u, 9u, 33u, 1024u}) {
      const size_t n = pixels_n * size_t(channels);
      std::vector<float> pixels(n);
      for (size_t i = 0; i < n; ++i) pixels[i] = float(i % 256) + 0.125f * float(i % 7);
      std::vector<float> out(n, -7.0f), in_place = pixels;
      Preprocess(pixels.data(), out.data(), n, scale.data(), offset.data(), channels);
      Preprocess(in_place.data(), in_place.data(), n, scale.data(), offset.data(), channels);
      for (size_t i = 0; i < n; ++i) {
        volatile float product = pixels[i] * scale[i % size_t(channels)];
        float want = product + offset[i % size_t(channels)];
        ASSERT_EQ(out[i], want) << channels << " " << n << " " << i;
        ASSERT_EQ(in_place[i], want) << channels << " " << n << " " << i;
      }
    }
  }
}

TEST(PreprocessingTest, OneValueForAllChannelsAndIdentity) {
  Preprocessing p;
  EXPECT_TRUE(p.IsIdentity());
  std::vector<float> scale, offset;
  p.Arrays(4, &scale, &offset);
  EXPECT_EQ(scale, std::vector<float>(4, 1.0f));
  std::vector<float> px = {-0.0f, 1.5f, 255.0f, 3.0f};
  std::vector<float> out(4);
  Preprocess(px.data(), out.data(), 4, scale.data(), offset.data(), 4);
  EXPECT_TRUE(std::signbit(out[0]));  // Copied as it is, like np.copyto.
  EXPECT_EQ(out[2], 255.0f);
  p.scale = {1.0, 2.0};
  EXPECT_THROW(p.Arrays(3, &scale, &offset), Error);
}

TEST(PreprocessingTest, AllFiniteFindsEveryNonFiniteValueAtEveryPosition) {
  const float inf = std::numeric_limits<float>::infinity();
  const float bad[] = {std::nanf(""), -std::nanf(""), inf, -inf};
  // Sizes around the 8-value lanes, the bad value at every position.
  for (size_t n : {1u, 7u, 8u, 9u, 17u, 784u}) {
    std::vector<float> v(n);
    for (size_t i = 0; i < n; ++i) v[i] = float(i) - 3.5f;
    v[0] = std::numeric_limits<float>::max();  // Largest finite: still finite.
    if (n > 1) v[1] = std::numeric_limits<float>::denorm_min();
    ASSERT_TRUE(AllFinite(v.data(), n)) << n;
    ASSERT_EQ(CountNonFinite(v.data(), n), 0u);
    for (size_t at = 0; at < n; ++at) {
      for (float b : bad) {
        std::vector<float> w = v;
        w[at] = b;
        ASSERT_FALSE(AllFinite(w.data(), n)) << n << " " << at << " " << b;
        ASSERT_EQ(CountNonFinite(w.data(), n), 1u);
      }
    }
  }
  std::vector<float> all_nan(10, std::nanf(""));
  EXPECT_EQ(CountNonFinite(all_nan.data(), all_nan.size()), 10u);
  EXPECT_TRUE(AllFinite(nullptr, 0));
}

}  // namespace
}  // namespace smtm
