#include "npy.h"

#include <cstring>
#include <fstream>
#include <iterator>

#include "smtm/error.h"

namespace smtm {
namespace {

[[noreturn]] void Bad(const std::string& path, const std::string& why) {
  throw Error(Error::Code::kArgument, path + " is not a supported .npy file: " + why + ".");
}

// The value of `'key': value` in the header's dict literal.
std::string Field(const std::string& header, const std::string& key, const std::string& path) {
  size_t at = header.find("'" + key + "'");
  if (at == std::string::npos) Bad(path, "its header has no '" + key + "'");
  at = header.find(':', at);
  if (at == std::string::npos) Bad(path, "malformed header");
  ++at;
  while (at < header.size() && header[at] == ' ') ++at;
  size_t end = at;
  if (at < header.size() && header[at] == '(') {
    end = header.find(')', at);
    if (end == std::string::npos) Bad(path, "malformed shape");
    return header.substr(at + 1, end - at - 1);
  }
  if (at < header.size() && header[at] == '\'') {
    end = header.find('\'', at + 1);
    if (end == std::string::npos) Bad(path, "malformed descr");
    return header.substr(at + 1, end - at - 1);
  }
  end = header.find_first_of(",}", at);
  return header.substr(at, end - at);
}

}  // namespace

size_t NpyArray::size() const {
  size_t n = 1;
  for (int64_t d : shape) n *= static_cast<size_t>(d);
  return n;
}

const float* NpyArray::f32() const {
  if (dtype != "<f4") throw Error(Error::Code::kArgument, "Expected float32 (<f4), got " + dtype + ".");
  return reinterpret_cast<const float*>(data.data());
}

const int32_t* NpyArray::i32() const {
  if (dtype != "<i4") throw Error(Error::Code::kArgument, "Expected int32 (<i4), got " + dtype + ".");
  return reinterpret_cast<const int32_t*>(data.data());
}

NpyArray LoadNpy(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw Error(Error::Code::kIo, "Cannot open " + path + ".");
  std::vector<uint8_t> bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  if (bytes.size() < 10 || std::memcmp(bytes.data(), "\x93NUMPY", 6) != 0) {
    Bad(path, "no .npy magic");
  }
  int major = bytes[6];
  size_t header_len = 0, start = 0;
  if (major == 1) {
    header_len = bytes[8] | (bytes[9] << 8);
    start = 10;
  } else if (major == 2 || major == 3) {
    if (bytes.size() < 12) Bad(path, "truncated header");
    header_len = bytes[8] | (bytes[9] << 8) | (bytes[10] << 16) | (size_t{bytes[11]} << 24);
    start = 12;
  } else {
    Bad(path, "format version " + std::to_string(major));
  }
  if (start + header_len > bytes.size()) Bad(path, "truncated header");
  std::string header(bytes.begin() + start, bytes.begin() + start + header_len);
  NpyArray a;
  a.dtype = Field(header, "descr", path);
  if (Field(header, "fortran_order", path).find("False") == std::string::npos) {
    Bad(path, "Fortran order");
  }
  std::string shape = Field(header, "shape", path);
  size_t pos = 0;
  while (pos < shape.size()) {
    size_t comma = shape.find(',', pos);
    std::string item = shape.substr(pos, comma == std::string::npos ? std::string::npos : comma - pos);
    if (item.find_first_not_of(' ') != std::string::npos) {
      try {
        long long v = std::stoll(item);
        if (v < 0) Bad(path, "negative dimension");
        a.shape.push_back(v);
      } catch (const std::logic_error&) {
        Bad(path, "malformed shape '" + shape + "'");
      }
    }
    if (comma == std::string::npos) break;
    pos = comma + 1;
  }
  size_t item = 0;
  if (a.dtype == "<f4" || a.dtype == "<i4") item = 4;
  else if (a.dtype == "<i8" || a.dtype == "<f8") item = 8;
  else Bad(path, "dtype " + a.dtype + " (supported: <f4, <i4, <i8, <f8)");
  size_t want = a.size() * item;
  size_t offset = start + header_len;
  if (bytes.size() - offset != want) {
    Bad(path, "its data has " + std::to_string(bytes.size() - offset) + " bytes, its shape needs " +
                  std::to_string(want));
  }
  a.data.assign(bytes.begin() + offset, bytes.end());
  return a;
}

}  // namespace smtm
