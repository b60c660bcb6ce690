// numpy .npy / .npz files as numpy writes and reads them (np.savez: a zip
// of stored .npy members with zip64 local extra fields). Internal to smtm_core.
#ifndef SMTM_CORE_NPZ_H_
#define SMTM_CORE_NPZ_H_

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace smtm::internal {

struct NpyArray {
  std::string descr;            // e.g. "<f8", "|b1", "<U40".
  bool fortran_order = false;
  std::vector<int64_t> shape;
  std::string data;             // Raw bytes in the stated order.

  int64_t size() const;         // Number of elements.
};

using NpzMembers = std::vector<std::pair<std::string, NpyArray>>;

uint32_t Crc32(const void* data, size_t n);

// The .npy v1.0 bytes np.save writes for the array (same header, padding).
std::string WriteNpy(const NpyArray& a);
// Parses .npy bytes (versions 1, 2, 3). Throws Error kState saying what is wrong.
NpyArray ReadNpy(const std::string& bytes);

// The .npz bytes np.savez writes for named arrays (member "<name>.npy").
std::string WriteNpz(const NpzMembers& members);
// The arrays of .npz bytes, by name without ".npy", in the archive's order;
// a name stored twice keeps the later member (as zipfile does).
// Throws Error kState for anything but a stored (uncompressed) zip of .npy
// members with correct CRCs.
NpzMembers ReadNpz(const std::string& bytes);

}  // namespace smtm::internal

#endif  // SMTM_CORE_NPZ_H_
