#include "npz.h"

#include <cstring>
#include <map>

#include "smtm/error.h"

namespace smtm::internal {
namespace {

[[noreturn]] void Bad(const std::string& what) {
  throw Error(Error::Code::kState, "not a numpy .npz file as np.savez writes it (" + what + ")");
}

void Put16(std::string* s, uint32_t v) {
  s->push_back(char(v & 0xff));
  s->push_back(char((v >> 8) & 0xff));
}
void Put32(std::string* s, uint32_t v) {
  Put16(s, v & 0xffff);
  Put16(s, v >> 16);
}
void Put64(std::string* s, uint64_t v) {
  Put32(s, uint32_t(v));
  Put32(s, uint32_t(v >> 32));
}

uint32_t Get16(const std::string& s, size_t at) {
  if (at > s.size() || s.size() - at < 2) Bad("truncated");
  return uint32_t(uint8_t(s[at])) | uint32_t(uint8_t(s[at + 1])) << 8;
}
uint32_t Get32(const std::string& s, size_t at) { return Get16(s, at) | Get16(s, at + 2) << 16; }
uint64_t Get64(const std::string& s, size_t at) {
  return uint64_t(Get32(s, at)) | uint64_t(Get32(s, at + 4)) << 32;
}

// Python's repr of a shape tuple: (), (3,), (2, 5).
std::string ShapeRepr(const std::vector<int64_t>& shape) {
  std::string s = "(";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + (shape.size() == 1 ? ",)" : ")");
}

// A minimal reader of the header dict's Python literal (ast.literal_eval of
// {'descr': '<f8', 'fortran_order': False, 'shape': (3,), }).
class HeaderParser {
 public:
  explicit HeaderParser(const std::string& t) : t_(t) {}

  NpyArray Parse() {
    NpyArray a;
    bool has_descr = false, has_order = false, has_shape = false;
    Expect('{');
    while (true) {
      Skip();
      if (Peek() == '}') {
        ++i_;
        break;
      }
      std::string key = String();
      Expect(':');
      Skip();
      if (key == "descr") {
        a.descr = String();
        has_descr = true;
      } else if (key == "fortran_order") {
        a.fortran_order = Bool();
        has_order = true;
      } else if (key == "shape") {
        a.shape = Tuple();
        has_shape = true;
      } else {
        Bad("the .npy header has the unknown key '" + key + "'");
      }
      Skip();
      if (Peek() == ',') {
        ++i_;
      } else if (Peek() != '}') {
        Bad("malformed .npy header");
      }
    }
    Skip();
    if (i_ != t_.size() || !has_descr || !has_order || !has_shape) Bad("malformed .npy header");
    return a;
  }

 private:
  char Peek() const { return i_ < t_.size() ? t_[i_] : '\0'; }
  void Skip() {
    while (i_ < t_.size() && (t_[i_] == ' ' || t_[i_] == '\n' || t_[i_] == '\t')) ++i_;
  }
  void Expect(char c) {
    Skip();
    if (Peek() != c) Bad("malformed .npy header");
    ++i_;
  }
  std::string String() {
    Skip();
    char q = Peek();
    if (q != '\'' && q != '"') Bad("malformed .npy header");
    size_t end = t_.find(q, i_ + 1);
    if (end == std::string::npos) Bad("malformed .npy header");
    std::string s = t_.substr(i_ + 1, end - i_ - 1);
    if (s.find('\\') != std::string::npos) Bad("malformed .npy header");
    i_ = end + 1;
    return s;
  }
  bool Bool() {
    if (t_.compare(i_, 4, "True") == 0) {
      i_ += 4;
      return true;
    }
    if (t_.compare(i_, 5, "False") == 0) {
      i_ += 5;
      return false;
    }
    Bad("malformed .npy header");
  }
  std::vector<int64_t> Tuple() {
    Expect('(');
    std::vector<int64_t> out;
    while (true) {
      Skip();
      if (Peek() == ')') {
        ++i_;
        return out;
      }
      size_t start = i_;
      while (i_ < t_.size() && t_[i_] >= '0' && t_[i_] <= '9') ++i_;
      if (i_ == start || i_ - start > 15) Bad("malformed .npy shape");
      out.push_back(std::stoll(t_.substr(start, i_ - start)));
      if (out.size() > 32) Bad("malformed .npy shape");
      Skip();
      if (Peek() == ',') {
        ++i_;
      } else if (Peek() != ')') {
        Bad("malformed .npy shape");
      }
    }
  }

  const std::string& t_;
  size_t i_ = 0;
};

// Bytes per element of a descr numpy writes ('<f8', '|b1', '<U40', ...).
int64_t ItemSize(const std::string& descr) {
  if (descr.size() < 3) Bad("unsupported dtype '" + descr + "'");
  char kind = descr[1];
  std::string digits = descr.substr(2);
  if (digits.empty() || digits.size() > 9 ||
      digits.find_first_not_of("0123456789") != std::string::npos) {
    Bad("unsupported dtype '" + descr + "'");
  }
  int64_t n = std::stoll(digits);
  if (std::string("biufU").find(kind) == std::string::npos || n < 1) {
    Bad("unsupported dtype '" + descr + "'");
  }
  return kind == 'U' ? 4 * n : n;
}

}  // namespace

int64_t NpyArray::size() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

uint32_t Crc32(const void* data, size_t n) {
  static uint32_t table[256];
  static bool ready = [] {
    for (uint32_t i = 0; i < 256; ++i) {
      uint32_t c = i;
      for (int k = 0; k < 8; ++k) c = c & 1 ? 0xedb88320u ^ (c >> 1) : c >> 1;
      table[i] = c;
    }
    return true;
  }();
  (void)ready;
  uint32_t c = 0xffffffffu;
  const uint8_t* p = static_cast<const uint8_t*>(data);
  for (size_t i = 0; i < n; ++i) c = table[(c ^ p[i]) & 0xff] ^ (c >> 8);
  return c ^ 0xffffffffu;
}

std::string WriteNpy(const NpyArray& a) {
  // numpy.lib.format._write_array_header, version 1.0.
  std::string header = "{'descr': '" + a.descr + "', 'fortran_order': " +
                       (a.fortran_order ? "True" : "False") + ", 'shape': " +
                       ShapeRepr(a.shape) + ", }";
  if (!a.shape.empty()) {
    // Room for the growth axis to grow in place (GROWTH_AXIS_MAX_DIGITS = 21).
    int64_t axis = a.shape[a.fortran_order ? a.shape.size() - 1 : 0];
    header += std::string(21 - std::to_string(axis).size(), ' ');
  }
  size_t total = 10 + header.size() + 1;
  size_t padded = (total + 63) / 64 * 64;
  header += std::string(padded - total, ' ') + "\n";
  std::string out = "\x93NUMPY";
  out.push_back('\x01');
  out.push_back('\x00');
  Put16(&out, uint32_t(header.size()));
  return out + header + a.data;
}

NpyArray ReadNpy(const std::string& b) {
  if (b.size() < 10 || b.compare(0, 6, "\x93NUMPY") != 0) Bad("a member is not a .npy array");
  int major = uint8_t(b[6]);
  size_t hlen, start;
  if (major == 1) {
    hlen = Get16(b, 8);
    start = 10;
  } else if (major == 2 || major == 3) {
    hlen = Get32(b, 8);
    start = 12;
  } else {
    Bad(".npy version " + std::to_string(major) + " is unknown");
  }
  if (hlen > b.size() - start) Bad("truncated .npy header");
  NpyArray a = HeaderParser(b.substr(start, hlen)).Parse();
  int64_t item = ItemSize(a.descr);
  if (a.descr[0] == '>' && item > 1) Bad("big-endian arrays are not read");
  if (a.descr[0] != '<' && a.descr[0] != '|' && a.descr[0] != '=' && a.descr[0] != '>') {
    Bad("unsupported dtype '" + a.descr + "'");
  }
  // Element count, guarding overflow: the data must be exactly this long.
  uint64_t count = 1;
  for (int64_t d : a.shape) {
    if (d != 0 && count > (uint64_t(1) << 40) / uint64_t(d)) Bad("the array is too large");
    count *= uint64_t(d);
  }
  uint64_t bytes = count * uint64_t(item);
  if (bytes != b.size() - start - hlen) Bad("the array's data has the wrong length");
  a.data = b.substr(start + hlen);
  return a;
}

std::string WriteNpz(const NpzMembers& members) {
  // As np.savez: zipfile, ZIP_STORED, force_zip64 local headers, 1980-01-01.
  std::string out, central;
  for (const auto& [name, array] : members) {
    const std::string file = name + ".npy";
    const std::string data = WriteNpy(array);
    const uint32_t crc = Crc32(data.data(), data.size());
    const uint64_t offset = out.size();
    Put32(&out, 0x04034b50);
    Put16(&out, 45);      // Version needed: zip64.
    Put16(&out, 0);       // Flags.
    Put16(&out, 0);       // Stored.
    Put16(&out, 0);       // Time 00:00:00.
    Put16(&out, 0x21);    // Date 1980-01-01.
    Put32(&out, crc);
    Put32(&out, 0xffffffffu);
    Put32(&out, 0xffffffffu);
    Put16(&out, uint32_t(file.size()));
    Put16(&out, 20);
    out += file;
    Put16(&out, 1);       // Zip64 extra: uncompressed, compressed sizes.
    Put16(&out, 16);
    Put64(&out, data.size());
    Put64(&out, data.size());
    out += data;

    Put32(&central, 0x02014b50);
    Put16(&central, 0x032d);  // Made by: Unix, 4.5.
    Put16(&central, 45);
    Put16(&central, 0);
    Put16(&central, 0);
    Put16(&central, 0);
    Put16(&central, 0x21);
    Put32(&central, crc);
    Put32(&central, uint32_t(data.size()));
    Put32(&central, uint32_t(data.size()));
    Put16(&central, uint32_t(file.size()));
    Put16(&central, 0);
    Put16(&central, 0);
    Put16(&central, 0);
    Put16(&central, 0);
    Put32(&central, 0x01800000u);  // -rw-------
    Put32(&central, uint32_t(offset));
    central += file;
  }
  const uint64_t cd_offset = out.size();
  out += central;
  Put32(&out, 0x06054b50);
  Put16(&out, 0);
  Put16(&out, 0);
  Put16(&out, uint32_t(members.size()));
  Put16(&out, uint32_t(members.size()));
  Put32(&out, uint32_t(central.size()));
  Put32(&out, uint32_t(cd_offset));
  Put16(&out, 0);
  return out;
}

NpzMembers ReadNpz(const std::string& b) {
  // The end of central directory record (no archive comment is expected,
  // but one is skipped as zipfile does).
  if (b.size() < 22) Bad("too short");
  size_t eocd = std::string::npos;
  size_t lowest = b.size() >= 22 + 65535 ? b.size() - 22 - 65535 : 0;
  for (size_t at = b.size() - 22 + 1; at-- > lowest;) {
    if (Get32(b, at) == 0x06054b50 && at + 22 + Get16(b, at + 20) == b.size()) {
      eocd = at;
      break;
    }
  }
  if (eocd == std::string::npos) Bad("no zip end record");
  uint64_t entries = Get16(b, eocd + 10);
  uint64_t cd_size = Get32(b, eocd + 12);
  uint64_t cd_offset = Get32(b, eocd + 16);
  if (cd_offset > eocd || cd_size > eocd - cd_offset) Bad("the zip directory is out of place");
  NpzMembers out;
  std::map<std::string, size_t> index;
  size_t at = size_t(cd_offset);
  for (uint64_t e = 0; e < entries; ++e) {
    if (at + 46 > eocd || Get32(b, at) != 0x02014b50) Bad("damaged zip directory");
    uint32_t flags = Get16(b, at + 8);
    uint32_t method = Get16(b, at + 10);
    uint32_t crc = Get32(b, at + 16);
    uint64_t csize = Get32(b, at + 20);
    uint64_t usize = Get32(b, at + 24);
    size_t name_len = Get16(b, at + 28), extra_len = Get16(b, at + 30),
           comment_len = Get16(b, at + 32);
    uint64_t local = Get32(b, at + 42);
    if (at + 46 + name_len + extra_len + comment_len > eocd) Bad("damaged zip directory");
    std::string name = b.substr(at + 46, name_len);
    // Zip64 sizes and offset in the directory's extra field, where marked.
    size_t x = at + 46 + name_len, xend = x + extra_len;
    while (x + 4 <= xend) {
      uint32_t id = Get16(b, x), len = Get16(b, x + 2);
      if (x + 4 + len > xend) Bad("damaged zip extra field");
      if (id == 1) {
        size_t y = x + 4;
        auto take = [&](uint64_t* v) {
          if (*v == 0xffffffffu) {
            if (y + 8 > x + 4 + len) Bad("damaged zip64 field");
            *v = Get64(b, y);
            y += 8;
          }
        };
        take(&usize);
        take(&csize);
        take(&local);
      }
      x += 4 + len;
    }
    at += 46 + name_len + extra_len + comment_len;
    if (flags & 1) Bad("member " + name + " is encrypted");
    if (method != 0) {
      Bad("member " + name + " is compressed; the runtime reads states saved uncompressed");
    }
    if (csize != usize) Bad("member " + name + " has mismatched sizes");
    if (local > cd_offset || cd_offset - local < 30 || Get32(b, size_t(local)) != 0x04034b50) {
      Bad("member " + name + " has no local header");
    }
    size_t lname = Get16(b, size_t(local) + 26), lextra = Get16(b, size_t(local) + 28);
    if (b.compare(size_t(local) + 30, lname, name) != 0 || lname != name_len) {
      Bad("member " + name + " is named differently in its local header");
    }
    uint64_t data_at = local + 30 + lname + lextra;
    if (data_at > cd_offset || usize > cd_offset - data_at) Bad("member " + name + " is truncated");
    std::string data = b.substr(size_t(data_at), size_t(usize));
    if (Crc32(data.data(), data.size()) != crc) Bad("member " + name + " fails its CRC check");
    if (name.size() < 4 || name.compare(name.size() - 4, 4, ".npy") != 0) {
      Bad("member " + name + " is not a .npy array");
    }
    name.resize(name.size() - 4);
    NpyArray array = ReadNpy(data);
    auto it = index.find(name);
    if (it != index.end()) {
      out[it->second].second = std::move(array);
    } else {
      index[name] = out.size();
      out.emplace_back(name, std::move(array));
    }
  }
  return out;
}

}  // namespace smtm::internal
