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

// The whole-file integrity record ("sha256-file:" + 64 hex digits) that
// newer converters store under "smtm_digest" instead of a ContentDigest.
inline constexpr const char* kDigestFilePrefix = "sha256-file:";

// SHA-256 (hex) of the file's bytes outside [start, end) (the record's own
// bytes), preceded by start and end - start as 8-byte little-endian numbers
// (metadata.py file_digest). Offsets past the file are clipped as Python slices are.
std::string FileDigest(const uint8_t* model, size_t n, uint64_t start, uint64_t end);

enum class DigestStatus {
  kOk,        // The record matches.
  kAbsent,    // No record: a file converted before records existed.
  kMismatch,  // The file is damaged (or holds more than one record).
};

// The integrity check a runtime runs before loading (metadata.py
// check_digest): records are the entries named "smtm_digest" or whose content
// starts with "sha256-file:"; none: kAbsent; several: kMismatch; one: a
// "sha256-file:" record must equal FileDigest over its own region, any other
// must equal ContentDigest. Throws Error kModelFile as ContentDigest.
DigestStatus CheckDigest(const uint8_t* model, size_t n);

// The bytes stored under metadata entry `name` (the first entry of that
// name), or nullopt when there is none. Throws Error kModelFile as ContentDigest.
std::optional<std::string> ReadMetadata(const uint8_t* model, size_t n, const std::string& name);

}  // namespace smtm

#endif  // SMTM_DIGEST_H_
