#include "smtm/preprocessing.h"

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "smtm/error.h"

namespace smtm {

bool Preprocessing::IsIdentity() const {
  for (double v : scale) {
    if (v != 1.0) return false;
  }
  for (double v : offset) {
    if (v != 0.0) return false;
  }
  return true;
}

void Preprocessing::Arrays(int channels, std::vector<float>* scale_out,
                           std::vector<float>* offset_out) const {
  for (int k = 0; k < 2; ++k) {
    const std::vector<double>& v = k == 0 ? scale : offset;
    if (v.size() != 1 && v.size() != size_t(channels)) {
      throw Error(Error::Code::kModelFile,
                  std::string("preprocessing.") + (k == 0 ? "scale" : "offset") + " has " +
                      std::to_string(v.size()) + " values for a model with " +
                      std::to_string(channels) +
                      " input channels: give one per channel, or one for all.");
    }
    std::vector<float>* out = k == 0 ? scale_out : offset_out;
    out->assign(size_t(channels), 0.0f);
    for (int c = 0; c < channels; ++c) {
      (*out)[size_t(c)] = static_cast<float>(v.size() == 1 ? v[0] : v[size_t(c)]);
    }
  }
}

// x86-64 desktops and servers: an AVX2 copy beside the baseline one, picked
// once at load by the CPU (an ifunc), halving the instructions of the host
// steps that read every pixel. Android and other targets: the baseline.
#if defined(__x86_64__) && defined(__linux__) && !defined(__ANDROID__) && \
    (defined(__GNUC__) || defined(__clang__))
#define SMTM_AVX2_CLONE __attribute__((target_clones("avx2", "default")))
#else
#define SMTM_AVX2_CLONE
#endif

namespace {

// dst = src * scale + offset over whole blocks of kPixels pixels of C
// channels; returns how many values it wrote (Preprocess does the rest). A
// block's scale and offset are laid out as the block's values are, so the
// inner loop has a fixed length over contiguous floats, which the compiler
// vectorises (the per-pixel loop over three channels it does not: 1.3 us ->
// 0.3 us for a 32x32x3 frame).
// `src` and `dst` do not overlap (restrict).
template <size_t C>
inline __attribute__((always_inline)) size_t AffineBlocks(
    const float* __restrict src, float* __restrict dst, size_t n, const float* scale,
    const float* offset) {
  constexpr size_t kPixels = 8, kBlock = kPixels * C;
  float s[kBlock], o[kBlock];
  for (size_t p = 0; p < kPixels; ++p) {
    for (size_t c = 0; c < C; ++c) {
      s[p * C + c] = scale[c];
      o[p * C + c] = offset[c];
    }
  }
  size_t i = 0;
  for (; i + kBlock <= n; i += kBlock) {
    for (size_t j = 0; j < kBlock; ++j) {
      // Two float32 roundings, as numpy's multiply then add (never a fused
      // multiply-add: built with -ffp-contract=off).
      float product = src[i + j] * s[j];
      dst[i + j] = product + o[j];
    }
  }
  return i;
}

// The blocks for 1-4 channels (0 values done for others), inlined into each
// clone (clang multiversions no function templates).
SMTM_AVX2_CLONE size_t Affine(const float* __restrict src, float* __restrict dst, size_t n,
                              const float* scale, const float* offset, int channels) {
  switch (channels) {
    case 1: return AffineBlocks<1>(src, dst, n, scale, offset);
    case 2: return AffineBlocks<2>(src, dst, n, scale, offset);
    case 3: return AffineBlocks<3>(src, dst, n, scale, offset);
    case 4: return AffineBlocks<4>(src, dst, n, scale, offset);
    default: return 0;
  }
}

}  // namespace

void Preprocess(const float* pixels, float* dst, size_t n, const float* scale,
                const float* offset, int channels) {
  bool identity = true;
  for (int c = 0; c < channels; ++c) identity = identity && scale[c] == 1.0f && offset[c] == 0.0f;
  if (identity) {
    // The runtime copies the frame as it is (np.copyto): -0.0 stays -0.0.
    if (dst != pixels) std::memmove(dst, pixels, n * sizeof(float));
    return;
  }
  // In place: all by the loop below.
  const size_t done = dst != pixels ? Affine(pixels, dst, n, scale, offset, channels) : 0;
  const size_t ch = size_t(channels);
  for (size_t i = done; i + ch <= n; i += ch) {  // One pixel's channels at a time: no modulo.
    for (size_t c = 0; c < ch; ++c) {
      float product = pixels[i + c] * scale[c];
      dst[i + c] = product + offset[c];
    }
  }
}

namespace {

constexpr uint32_t kExponent = 0x7f800000u;  // All ones: infinity or NaN.

uint32_t ExponentBits(const float* v) {
  uint32_t bits;
  std::memcpy(&bits, v, sizeof bits);
  return bits & kExponent;
}

}  // namespace

SMTM_AVX2_CLONE bool AllFinite(const float* values, size_t n) {
  // Per lane, whether any value had every exponent bit set, as a mask: an
  // AND, an equality and an OR per value, which SSE2 and NEON do four lanes
  // at a time and AVX2 eight (a max of unsigned lanes is not in SSE2, and a
  // branch per value stops vectorising).
  constexpr size_t kLanes = 16;
  uint32_t bad[kLanes] = {};
  size_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (size_t k = 0; k < kLanes; ++k) {
      bad[k] |= ExponentBits(values + i + k) == kExponent ? ~0u : 0u;
    }
  }
  uint32_t any = 0;
  for (size_t k = 0; k < kLanes; ++k) any |= bad[k];
  for (; i < n; ++i) any |= static_cast<uint32_t>(ExponentBits(values + i) == kExponent);
  return any == 0;
}

size_t CountNonFinite(const float* values, size_t n) {
  size_t bad = 0;
  for (size_t i = 0; i < n; ++i) bad += ExponentBits(values + i) == kExponent;
  return bad;
}

}  // namespace smtm
