#include "smtm/preprocessing.h"

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

void Preprocess(const float* pixels, float* dst, size_t n, const float* scale,
                const float* offset, int channels) {
  bool identity = true;
  for (int c = 0; c < channels; ++c) identity = identity && scale[c] == 1.0f && offset[c] == 0.0f;
  if (identity) {
    // The runtime copies the frame as it is (np.copyto): -0.0 stays -0.0.
    if (dst != pixels) std::memmove(dst, pixels, n * sizeof(float));
    return;
  }
  const size_t ch = size_t(channels);
  for (size_t i = 0; i < n; ++i) {
    // Two float32 roundings, as numpy's multiply then add (never a fused multiply-add).
    float product = pixels[i] * scale[i % ch];  // Built with -ffp-contract=off.
    dst[i] = product + offset[i % ch];
  }
}

}  // namespace smtm
