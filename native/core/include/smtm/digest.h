// SHA-256 and the model file's content digest (smtm_tf/runtime/metadata.py).
#ifndef SMTM_DIGEST_H_
#define SMTM_DIGEST_H_

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>

namespace smtm {

// The SHA-256 (FIPS 180-4) of `n` bytes, as 64 lower-case hex digits.
std::string Sha256Hex(const void* data, size_t n);

// The metadata entry name holding the content digest.
inline constexpr const char* kDigestName = "smtm_digest";
// The metadata entry name holding the descriptor JSON.
inline constexpr const char* kDescriptorName = "smtm_descriptor";

// Port of metadata.py content_digest: SHA-256 over the model's buffers in
// order (each as its length, 8 bytes little-endian, then its bytes), except
// the buffers of metadata entries named "smtm_digest"; hex.
// Throws Error kModelFile for bytes that are not a well-formed .tflite
// flatbuffer (every offset is bounds-checked; never reads outside [model, model + n)).
std::string ContentDigest(const uint8_t* model, size_t n);

// The bytes stored under metadata entry `name` (the first entry of that
// name), or nullopt when there is none. Throws Error kModelFile as ContentDigest.
std::optional<std::string> ReadMetadata(const uint8_t* model, size_t n, const std::string& name);

}  // namespace smtm

#endif  // SMTM_DIGEST_H_
