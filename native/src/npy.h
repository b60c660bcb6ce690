// Reads numpy .npy files (format 1.0-3.0, little-endian, C order) for the
// CLI and the tests: frames (float32) and decisions (int32).
#ifndef SMTM_NATIVE_SRC_NPY_H_
#define SMTM_NATIVE_SRC_NPY_H_

#include <cstdint>
#include <string>
#include <vector>

namespace smtm {

struct NpyArray {
  std::string dtype;  // numpy descr, e.g. "<f4", "<i4".
  std::vector<int64_t> shape;
  std::vector<uint8_t> data;
  size_t size() const;  // Number of elements.
  const float* f32() const;
  const int32_t* i32() const;
};

// Throws smtm::Error kIo (unreadable) or kArgument (not a supported .npy),
// naming the file and what is wrong.
NpyArray LoadNpy(const std::string& path);

}  // namespace smtm

#endif  // SMTM_NATIVE_SRC_NPY_H_
