// SHA-256 (FIPS 180-4) and a bounds-checked reader of a .tflite flatbuffer's
// buffers and metadata (port of smtm_tf/runtime/metadata.py).
#include "smtm/digest.h"

#include <algorithm>
#include <cstring>
#include <vector>

#include "smtm/error.h"

namespace smtm {
namespace {

constexpr uint32_t kK[64] = {
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4,
    0xab1c5ed5, 0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe,
    0x9bdc06a7, 0xc19bf174, 0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f,
    0x4a7484aa, 0x5cb0a9dc, 0x76f988da, 0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7,
    0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967, 0x27b70a85, 0x2e1b2138, 0x4d2c6dfc,
    0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85, 0xa2bfe8a1, 0xa81a664b,
    0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070, 0x19a4c116,
    0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
    0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7,
    0xc67178f2};

inline uint32_t Rotr(uint32_t x, int n) { return (x >> n) | (x << (32 - n)); }

// Incremental SHA-256.
class Sha256 {
 public:
  void Update(const void* data, size_t n) {
    const uint8_t* p = static_cast<const uint8_t*>(data);
    bits_ += uint64_t(n) * 8;
    while (n > 0) {
      size_t take = std::min(n, size_t(64) - fill_);
      std::memcpy(block_ + fill_, p, take);
      fill_ += take;
      p += take;
      n -= take;
      if (fill_ == 64) {
        Compress(block_);
        fill_ = 0;
      }
    }
  }

  std::string HexDigest() {
    uint64_t bits = bits_;
    uint8_t pad[72] = {0x80};
    size_t padlen = (fill_ < 56 ? 56 : 120) - fill_;
    for (int i = 0; i < 8; ++i) pad[padlen + i] = uint8_t(bits >> (56 - 8 * i));
    Update(pad, padlen + 8);
    static const char* hex = "0123456789abcdef";
    std::string out;
    for (uint32_t v : h_) {
      for (int i = 7; i >= 0; --i) out += hex[(v >> (4 * i)) & 15];
    }
    return out;
  }

 private:
  void Compress(const uint8_t* b) {
    uint32_t w[64];
    for (int i = 0; i < 16; ++i) {
      w[i] = uint32_t(b[4 * i]) << 24 | uint32_t(b[4 * i + 1]) << 16 |
             uint32_t(b[4 * i + 2]) << 8 | uint32_t(b[4 * i + 3]);
    }
    for (int i = 16; i < 64; ++i) {
      uint32_t s0 = Rotr(w[i - 15], 7) ^ Rotr(w[i - 15], 18) ^ (w[i - 15] >> 3);
      uint32_t s1 = Rotr(w[i - 2], 17) ^ Rotr(w[i - 2], 19) ^ (w[i - 2] >> 10);
      w[i] = w[i - 16] + s0 + w[i - 7] + s1;
    }
    uint32_t a = h_[0], b2 = h_[1], c = h_[2], d = h_[3], e = h_[4], f = h_[5], g = h_[6],
             h = h_[7];
    for (int i = 0; i < 64; ++i) {
      uint32_t t1 = h + (Rotr(e, 6) ^ Rotr(e, 11) ^ Rotr(e, 25)) + ((e & f) ^ (~e & g)) + kK[i] +
                    w[i];
      uint32_t t2 = (Rotr(a, 2) ^ Rotr(a, 13) ^ Rotr(a, 22)) + ((a & b2) ^ (a & c) ^ (b2 & c));
      h = g;
      g = f;
      f = e;
      e = d + t1;
      d = c;
      c = b2;
      b2 = a;
      a = t1 + t2;
    }
    h_[0] += a;
    h_[1] += b2;
    h_[2] += c;
    h_[3] += d;
    h_[4] += e;
    h_[5] += f;
    h_[6] += g;
    h_[7] += h;
  }

  uint32_t h_[8] = {0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a,
                    0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19};
  uint8_t block_[64] = {};
  size_t fill_ = 0;
  uint64_t bits_ = 0;
};

[[noreturn]] void Bad(const std::string& what) {
  throw Error(Error::Code::kModelFile,
              "Not a .tflite flatbuffer (" + what + "). Use a model made by smtm_tf's converter.");
}

// The flatbuffer tables of a TFLite Model this runtime reads (schema.fbs:
// Model.buffers is field 4, Model.metadata field 6; Buffer: data 0, offset 1,
// size 2; Metadata: name 0, buffer 1). Every read is bounds-checked.
class Reader {
 public:
  Reader(const uint8_t* p, size_t n) : p_(p), n_(n) {}

  uint32_t U32(size_t at) const {
    Need(at, 4);
    return uint32_t(p_[at]) | uint32_t(p_[at + 1]) << 8 | uint32_t(p_[at + 2]) << 16 |
           uint32_t(p_[at + 3]) << 24;
  }
  uint64_t U64(size_t at) const { return uint64_t(U32(at)) | uint64_t(U32(at + 4)) << 32; }
  uint16_t U16(size_t at) const {
    Need(at, 2);
    return uint16_t(p_[at] | p_[at + 1] << 8);
  }
  // The position of a table field's value, or 0 when the field is absent.
  size_t Field(size_t table, int index) const {
    int64_t vtable = int64_t(table) - int64_t(int32_t(U32(table)));
    if (vtable < 0) Bad("a table's vtable lies outside the file");
    uint16_t vsize = U16(size_t(vtable));
    size_t slot = 4 + 2 * size_t(index);
    if (slot + 2 > vsize) return 0;
    uint16_t off = U16(size_t(vtable) + slot);
    if (off == 0) return 0;
    Need(table + off, 1);
    return table + off;
  }
  size_t Deref(size_t at) const {
    size_t to = at + U32(at);
    Need(to, 1);
    return to;
  }
  // (position of the first element, length) of the vector a field points to.
  std::pair<size_t, size_t> Vector(size_t field, size_t elem) const {
    if (field == 0) return {0, 0};
    size_t v = Deref(field);
    size_t len = U32(v);
    if (len > (n_ - v - 4) / elem) Bad("a vector runs past the end of the file");
    return {v + 4, len};
  }
  size_t TableAt(size_t elem_pos) const { return Deref(elem_pos); }
  const uint8_t* Bytes(size_t at) const { return p_ + at; }
  size_t size() const { return n_; }

 private:
  void Need(size_t at, size_t k) const {
    if (at > n_ || k > n_ - at) Bad("an offset points outside the file");
  }
  const uint8_t* p_;
  size_t n_;
};

struct Model {
  Reader r;
  size_t root = 0;
  std::pair<size_t, size_t> buffers, metadata;

  Model(const uint8_t* p, size_t n) : r(p, n) {
    if (p == nullptr || n < 8) Bad("too short");
    root = r.Deref(0);
    buffers = r.Vector(r.Field(root, 4), 4);
    metadata = r.Vector(r.Field(root, 6), 4);
  }

  // Where buffer `index`'s bytes lie in the file, [start, end) (metadata.py
  // _buffer_region): after the flatbuffer when it has an offset (not clipped
  // to the file), else its data vector's elements; an empty one is (0, 0).
  std::pair<uint64_t, uint64_t> Region(size_t index) const {
    if (index >= buffers.second) Bad("a metadata entry names buffer " + std::to_string(index) +
                                     " of " + std::to_string(buffers.second));
    size_t table = r.TableAt(buffers.first + 4 * index);
    size_t off_field = r.Field(table, 1);
    uint64_t offset = off_field ? r.U64(off_field) : 0;
    if (offset != 0) {
      size_t size_field = r.Field(table, 2);
      uint64_t size = size_field ? r.U64(size_field) : 0;
      if (size > ~uint64_t(0) - offset) Bad("a buffer's offset and size overflow");
      return {offset, offset + size};
    }
    auto data = r.Vector(r.Field(table, 0), 1);
    if (data.second == 0) return {0, 0};
    return {data.first, data.first + data.second};
  }

  // The bytes of buffer `index` (metadata.py _buffer): its region, clipped
  // to the file as a Python slice is.
  std::pair<const uint8_t*, size_t> Buffer(size_t index) const {
    auto [start, end] = Region(index);
    uint64_t n = r.size();
    start = std::min(start, n);
    end = std::max(start, std::min(end, n));
    return {r.Bytes(size_t(start)), size_t(end - start)};
  }

  // Metadata entry i: (name, buffer index).
  std::pair<std::string_view, uint32_t> Entry(size_t i) const {
    size_t table = r.TableAt(metadata.first + 4 * i);
    size_t name_field = r.Field(table, 0);
    std::string_view name;
    bool has_name = name_field != 0;
    if (has_name) {
      auto s = r.Vector(name_field, 1);
      name = std::string_view(reinterpret_cast<const char*>(r.Bytes(s.first)), s.second);
    }
    size_t buf_field = r.Field(table, 1);
    uint32_t buffer = buf_field ? r.U32(buf_field) : 0;
    return {has_name ? name : std::string_view("\0<none>", 7), buffer};
  }
};

}  // namespace

std::string Sha256Hex(const void* data, size_t n) {
  Sha256 h;
  h.Update(data, n);
  return h.HexDigest();
}

std::string ContentDigest(const uint8_t* model, size_t n) {
  Model m(model, n);
  std::vector<bool> skip(m.buffers.second, false);
  std::vector<uint32_t> skipped;
  for (size_t i = 0; i < m.metadata.second; ++i) {
    auto entry = m.Entry(i);
    if (entry.first == kDigestName) skipped.push_back(entry.second);
  }
  for (uint32_t b : skipped) {
    if (b < skip.size()) skip[b] = true;
  }
  Sha256 h;
  for (size_t i = 0; i < m.buffers.second; ++i) {
    if (skip[i]) continue;
    auto data = m.Buffer(i);
    uint8_t len[8];
    for (int k = 0; k < 8; ++k) len[k] = uint8_t(uint64_t(data.second) >> (8 * k));
    h.Update(len, 8);
    if (data.second) h.Update(data.first, data.second);
  }
  return h.HexDigest();
}

std::string FileDigest(const uint8_t* model, size_t n, uint64_t start, uint64_t end) {
  if (model == nullptr && n != 0) throw Error(Error::Code::kArgument, "no model bytes");
  if (end < start) throw Error(Error::Code::kModelFile, "Not a .tflite flatbuffer (a buffer "
                                                        "region ends before it starts).");
  Sha256 h;
  uint8_t head[16];
  for (int k = 0; k < 8; ++k) {
    head[k] = uint8_t(start >> (8 * k));
    head[8 + k] = uint8_t((end - start) >> (8 * k));
  }
  h.Update(head, 16);
  const size_t a = size_t(std::min<uint64_t>(start, n)), b = size_t(std::min<uint64_t>(end, n));
  if (a) h.Update(model, a);
  if (b < n) h.Update(model + b, n - b);
  return h.HexDigest();
}

DigestStatus CheckDigest(const uint8_t* model, size_t n) {
  Model m(model, n);
  // Entries named smtm_digest, or holding a whole-file record (a damaged
  // name does not hide one).
  struct Record {
    std::string content;
    std::pair<uint64_t, uint64_t> region;
  };
  std::vector<Record> records;
  const std::string prefix = kDigestFilePrefix;
  for (size_t i = 0; i < m.metadata.second; ++i) {
    auto entry = m.Entry(i);
    auto region = m.Region(entry.second);
    auto data = m.Buffer(entry.second);
    std::string content(reinterpret_cast<const char*>(data.first), data.second);
    if (entry.first == kDigestName || content.compare(0, prefix.size(), prefix) == 0) {
      records.push_back({std::move(content), region});
    }
  }
  if (records.empty()) return DigestStatus::kAbsent;
  if (records.size() > 1) return DigestStatus::kMismatch;
  const Record& rec = records[0];
  bool ok;
  if (rec.content.compare(0, prefix.size(), prefix) == 0) {
    ok = rec.content.substr(prefix.size()) ==
         FileDigest(model, n, rec.region.first, rec.region.second);
  } else {  // A record of a file converted earlier: its buffers only.
    ok = rec.content == ContentDigest(model, n);
  }
  return ok ? DigestStatus::kOk : DigestStatus::kMismatch;
}

std::optional<std::string> ReadMetadata(const uint8_t* model, size_t n, const std::string& name) {
  Model m(model, n);
  for (size_t i = 0; i < m.metadata.second; ++i) {
    auto entry = m.Entry(i);
    if (entry.first == name) {
      auto data = m.Buffer(entry.second);
      if (data.second == 0) return std::string();
      return std::string(reinterpret_cast<const char*>(data.first), data.second);
    }
  }
  return std::nullopt;
}

}  // namespace smtm
