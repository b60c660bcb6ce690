// libFuzzer target: the .tflite flatbuffer reader (ContentDigest and
// ReadMetadata, CheckDigest) on arbitrary bytes: a digest, the entry, a
// status, or Error kModelFile.
#include <cstddef>
#include <cstdint>
#include <cstdlib>

#include "smtm/digest.h"
#include "smtm/error.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  try {
    if (smtm::ContentDigest(data, size).size() != 64) std::abort();
  } catch (const smtm::Error& e) {
    if (e.code() != smtm::Error::Code::kModelFile) std::abort();
  }
  try {
    smtm::CheckDigest(data, size);
  } catch (const smtm::Error& e) {
    if (e.code() != smtm::Error::Code::kModelFile) std::abort();
  }
  try {
    smtm::ReadMetadata(data, size, smtm::kDescriptorName);
  } catch (const smtm::Error& e) {
    if (e.code() != smtm::Error::Code::kModelFile) std::abort();
  }
  return 0;
}
