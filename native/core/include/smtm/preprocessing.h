// Input preprocessing: the model sees `pixel * scale + offset`, per channel.
#ifndef SMTM_PREPROCESSING_H_
#define SMTM_PREPROCESSING_H_

#include <cstddef>
#include <string>
#include <vector>

namespace smtm {

// As smtm_tf/runtime/preprocessing.py Preprocessing.
struct Preprocessing {
  std::vector<double> scale{1.0};   // One per channel, or one for all.
  std::vector<double> offset{0.0};  // One per channel, or one for all.
  std::string source = "raw";

  // All scales 1 and all offsets 0.
  bool IsIdentity() const;
  // Per-channel float32 scale and offset for `channels` channels (one value
  // broadcast to all). Throws Error kModelFile if the counts do not fit.
  void Arrays(int channels, std::vector<float>* scale_out, std::vector<float>* offset_out) const;
};

// dst[i] = pixels[i] * scale[i % channels] + offset[i % channels], rounded to
// float32 after the multiply and after the add exactly as numpy's
// `multiply(frame, scale, out=dst); add(dst, offset, out=dst)` does.
// `n` is the number of values (a multiple of `channels`); `scale` and
// `offset` hold `channels` float32 values each. dst equals pixels or does
// not overlap them.
void Preprocess(const float* pixels, float* dst, size_t n, const float* scale,
                const float* offset, int channels);

// Whether every value is finite (no NaN, no infinity): np.isfinite(v).all().
// Compares the exponent bits eight lanes at a time (the compiler vectorises
// it): about one instruction per value instead of a branchy std::isfinite loop.
bool AllFinite(const float* values, size_t n);

// How many values are NaN or infinite (for the error message).
size_t CountNonFinite(const float* values, size_t n);

}  // namespace smtm

#endif  // SMTM_PREPROCESSING_H_
