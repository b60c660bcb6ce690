// Memory::Save / Memory::Load: the state file host.py save_state and
// load_state read and write (MemoryState.to_arrays / from_arrays in an .npz).
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <sstream>

#include <nlohmann/json.hpp>

#include "npz.h"
#include "numeric.h"
#include "smtm/error.h"
#include "smtm/memory.h"

namespace smtm {
namespace {

using internal::NpyArray;

template <typename T>
NpyArray Array(const char* descr, std::vector<int64_t> shape, const T* data, size_t n) {
  NpyArray a;
  a.descr = descr;
  a.shape = std::move(shape);
  a.data.assign(reinterpret_cast<const char*>(data), n * sizeof(T));
  return a;
}

NpyArray Bools(const std::vector<uint8_t>& v) {
  std::vector<uint8_t> b(v.size());
  for (size_t i = 0; i < v.size(); ++i) b[i] = v[i] ? 1 : 0;
  return Array("|b1", {int64_t(v.size())}, b.data(), b.size());
}

// A numpy '<U' scalar holding `text` (ASCII here: JSON of ASCII strings).
NpyArray Unicode(const std::string& text) {
  std::vector<uint32_t> chars(text.begin(), text.end());
  if (chars.empty()) chars.push_back(0);
  NpyArray a = Array("<U", {}, chars.data(), chars.size());
  a.descr = "<U" + std::to_string(chars.size());
  return a;
}

[[noreturn]] void Bad(const std::string& why) { throw Error(Error::Code::kState, why); }

// An array's values in C order as float64 (what `astype(np.float64)` gives).
std::vector<double> Doubles(const std::string& name, const NpyArray& a) {
  const char kind = a.descr[1];
  const int size = std::stoi(a.descr.substr(2));
  const size_t n = size_t(a.size());
  std::vector<double> out(n);
  const char* p = a.data.data();
  for (size_t i = 0; i < n; ++i) {
    const char* e = p + i * size_t(size);
    double v;
    if (kind == 'f' && size == 8) {
      std::memcpy(&v, e, 8);
    } else if (kind == 'f' && size == 4) {
      float f;
      std::memcpy(&f, e, 4);
      v = f;
    } else if (kind == 'b' && size == 1) {
      v = *e ? 1.0 : 0.0;
    } else if ((kind == 'i' || kind == 'u') && (size == 1 || size == 2 || size == 4 || size == 8)) {
      uint64_t u = 0;
      std::memcpy(&u, e, size_t(size));
      if (kind == 'i' && size < 8 && (u >> (8 * size - 1)) & 1) u |= ~uint64_t(0) << (8 * size);
      v = kind == 'i' ? double(int64_t(u)) : double(u);
    } else {
      Bad("state array '" + name + "' has the unsupported dtype " + a.descr + ".");
    }
    out[i] = v;
  }
  if (a.fortran_order && a.shape.size() > 1) {
    // Reorder Fortran-order values to C order.
    std::vector<double> c(n);
    const size_t nd = a.shape.size();
    std::vector<size_t> idx(nd, 0);
    for (size_t f = 0; f < n; ++f) {
      // idx is the multi-index of Fortran position f (first axis fastest).
      size_t pos = 0;
      for (size_t d = 0; d < nd; ++d) pos = pos * size_t(a.shape[d]) + idx[d];
      c[pos] = out[f];
      for (size_t d = 0; d < nd; ++d) {
        if (++idx[d] < size_t(a.shape[d])) break;
        idx[d] = 0;
      }
    }
    out.swap(c);
  }
  return out;
}

// Python's int(v) of an int64 or float64 value (truncation), for checked values.
// Values beyond +-2^62 (all out of every range checked) are clamped there.
int64_t Int(double v) {
  constexpr double kBig = 4611686018427387904.0;  // 2^62
  return v >= kBig ? int64_t(kBig) : v <= -kBig ? -int64_t(kBig) : int64_t(std::trunc(v));
}

void WriteAtomic(const std::string& path, const std::string& bytes) {
  namespace fs = std::filesystem;
  std::error_code ec;
  fs::path target = fs::absolute(fs::path(path), ec);
  if (ec) throw Error(Error::Code::kIo, "Cannot resolve the state path " + path + ".");
  fs::create_directories(target.parent_path(), ec);
  if (ec) {
    throw Error(Error::Code::kIo, "Cannot create the folder of the state path " + path + ": " +
                                      ec.message() + ".");
  }
  // As io_utils.atomic_path: ".<name>.tmp-XXXXXX<ext>" beside the target.
  std::string tmpl = (target.parent_path() / ("." + target.filename().string() + ".tmp-XXXXXX" +
                                              target.extension().string())).string();
  std::vector<char> name(tmpl.begin(), tmpl.end());
  name.push_back('\0');
  int fd = mkstemps(name.data(), int(target.extension().string().size()));
  if (fd < 0) {
    throw Error(Error::Code::kIo,
                "Cannot write the state file " + path + ": " + std::strerror(errno) + ".");
  }
  std::string tmp(name.data());
  mode_t mask = umask(0);
  umask(mask);
  fchmod(fd, 0666 & ~mask);
  bool ok = true;
  size_t done = 0;
  while (ok && done < bytes.size()) {
    ssize_t w = ::write(fd, bytes.data() + done, bytes.size() - done);
    if (w < 0 && errno == EINTR) continue;
    ok = w > 0;
    if (ok) done += size_t(w);
  }
  int saved = errno;
  ok = ok && ::fsync(fd) == 0;
  if (!ok) saved = errno;
  ok = (::close(fd) == 0) && ok;
  if (ok && std::rename(tmp.c_str(), target.c_str()) != 0) {
    saved = errno;
    ok = false;
  }
  if (!ok) {
    ::unlink(tmp.c_str());
    throw Error(Error::Code::kIo,
                "Cannot write the state file " + path + ": " + std::strerror(saved) + ".");
  }
}

// Refuses `rows` float32 rows of `dim` values whose float32 L2 norm (numpy's
// pairwise sum of squares; an overflowing square is infinite) exceeds
// `limit`, compared in float32 as numpy does.
void RowNormsAtMost(const std::vector<float>& values, size_t rows, size_t dim, float limit,
                    const char* why) {
  std::vector<float> squares(dim);
  for (size_t r = 0; r < rows; ++r) {
    for (size_t i = 0; i < dim; ++i) {
      const float x = values[r * dim + i];
      squares[i] = x * x;
    }
    if (std::sqrt(internal::PairwiseSum(squares.data(), dim)) > limit) Bad(why);
  }
}

}  // namespace

void Memory::Save(const std::string& path, const std::string& fingerprint) const {
  const int64_t S = num_stages_, K = num_classes_, D = dim_;
  const int64_t m = std::max<int64_t>(slots_, 1);
  internal::NpzMembers members;
  members.emplace_back("state_scores", Array("<f8", {K}, scores_.data(), scores_.size()));
  members.emplace_back("state_hot", Bools(hot_));
  members.emplace_back("state_capacity", Array("<i8", {}, &capacity_, 1));
  members.emplace_back("state_frame_in_window", Array("<i8", {}, &frame_in_window_, 1));
  members.emplace_back("state_left_out", Array("<i8", {K}, left_out_.data(), left_out_.size()));
  members.emplace_back("state_answers", Array("<i8", {K}, answers_.data(), answers_.size()));
  members.emplace_back("state_inst", Array("<f4", {S, m, D}, inst_.data(), inst_.size()));
  members.emplace_back("state_inst_class",
                       Array("<i8", {S, m}, inst_class_.data(), inst_class_.size()));
  // np.array([count, next]).T: a Fortran-order [S, 2] array (C order when S == 1).
  std::vector<int64_t> pos(inst_count_);
  pos.insert(pos.end(), inst_next_.begin(), inst_next_.end());
  NpyArray inst_pos = Array("<i8", {S, 2}, pos.data(), pos.size());
  inst_pos.fortran_order = S > 1;
  members.emplace_back("state_inst_pos", inst_pos);
  members.emplace_back("state_offsets", Array("<f4", {S, K, D}, offsets_.data(), offsets_.size()));
  members.emplace_back("state_adapted", Bools(adapted_));
  // Saturated at the bound Load accepts, so a saved state always restores
  // (reached only from a restored state at the bound).
  int64_t counters[5] = {exits_, checks_, disagreements_, reverts_, exit_run_};
  for (int64_t& c : counters) c = std::min(c, kMaxCount);
  members.emplace_back("state_counters", Array("<i8", {5}, counters, 5));
  // json.dumps({"format_version": 3, "model": fingerprint}).
  nlohmann::json fp = fingerprint;
  members.emplace_back("meta", Unicode("{\"format_version\": " +
                                       std::to_string(kStateFormatVersion) +
                                       ", \"model\": " + fp.dump(-1, ' ', true) + "}"));
  WriteAtomic(path, internal::WriteNpz(members));
}

void Memory::Load(const std::string& path, const std::string& fingerprint) {
  std::ifstream f(path, std::ios::binary);
  if (!f) Bad("Cannot read the state file " + path + ".");
  std::ostringstream buf;
  buf << f.rdbuf();
  if (f.bad()) Bad("Cannot read the state file " + path + ".");
  std::map<std::string, NpyArray> arrays;
  for (auto& [name, a] : internal::ReadNpz(buf.str())) arrays[name] = std::move(a);

  // host.py load_state: the meta entry.
  auto meta_it = arrays.find("meta");
  if (meta_it == arrays.end()) Bad("the state file has no 'meta' entry.");
  const NpyArray& meta = meta_it->second;
  if (meta.descr.size() < 3 || meta.descr.compare(0, 2, "<U") != 0 || !meta.shape.empty()) {
    Bad("the state file's 'meta' entry is not a string.");
  }
  std::string text;
  for (size_t i = 0; i + 4 <= meta.data.size(); i += 4) {
    uint32_t c;
    std::memcpy(&c, meta.data.data() + i, 4);
    // UCS-4 to UTF-8.
    if (c < 0x80) {
      text.push_back(char(c));
    } else if (c < 0x800) {
      text.push_back(char(0xc0 | (c >> 6)));
      text.push_back(char(0x80 | (c & 0x3f)));
    } else if (c < 0x10000) {
      text.push_back(char(0xe0 | (c >> 12)));
      text.push_back(char(0x80 | ((c >> 6) & 0x3f)));
      text.push_back(char(0x80 | (c & 0x3f)));
    } else if (c < 0x110000) {
      text.push_back(char(0xf0 | (c >> 18)));
      text.push_back(char(0x80 | ((c >> 12) & 0x3f)));
      text.push_back(char(0x80 | ((c >> 6) & 0x3f)));
      text.push_back(char(0x80 | (c & 0x3f)));
    } else {
      Bad("the state file's 'meta' entry is not a valid string.");
    }
  }
  while (!text.empty() && text.back() == '\0') text.pop_back();  // numpy strips trailing NULs.
  nlohmann::json m;
  try {
    m = nlohmann::json::parse(text);
  } catch (const nlohmann::json::exception&) {
    Bad("the state file's 'meta' entry is not JSON.");
  }
  if (!m.is_object()) Bad("the state file's 'meta' entry is not a JSON object.");
  auto version = m.find("format_version");
  if (version == m.end() || !version->is_number() || version->get<double>() != kStateFormatVersion) {
    Bad("state format " + (version == m.end() ? std::string("None") : version->dump()) +
        ", this runtime reads " + std::to_string(kStateFormatVersion));
  }
  auto model = m.find("model");
  if (model == m.end() || !model->is_string() || model->get<std::string>() != fingerprint) {
    Bad("it was saved for another model, exit rule or cache policy");
  }

  // MemoryState.from_arrays.
  const int64_t S = num_stages_, K = num_classes_, D = dim_;
  const int64_t m_slots = std::max<int64_t>(slots_, 1);
  const std::pair<const char*, std::vector<int64_t>> expected[] = {
      {"scores", {K}}, {"hot", {K}}, {"capacity", {}}, {"frame_in_window", {}},
      {"left_out", {K}}, {"answers", {K}}, {"inst", {S, m_slots, D}},
      {"inst_class", {S, m_slots}}, {"inst_pos", {S, 2}}, {"offsets", {S, K, D}},
      {"adapted", {K}}, {"counters", {5}}};
  std::vector<std::string> missing;
  for (const auto& [name, shape] : expected) {
    if (!arrays.count(std::string("state_") + name)) missing.push_back(name);
  }
  if (!missing.empty()) {
    std::string list;
    for (const auto& n : missing) list += (list.empty() ? "'" : ", '") + n + "'";
    Bad("state arrays [" + list + "] are missing.");
  }
  std::map<std::string, std::vector<double>> v;
  // The arrays the memory holds in float32 (the others in float64 or as integers).
  std::map<std::string, std::vector<float>> f32 = {{"inst", {}}, {"offsets", {}}};
  for (const auto& [name, shape] : expected) {
    const NpyArray& a = arrays[std::string("state_") + name];
    if (a.shape != shape) {
      auto text_of = [](const std::vector<int64_t>& s) {
        std::string t = "(";
        for (size_t i = 0; i < s.size(); ++i) t += (i ? ", " : "") + std::to_string(s[i]);
        return t + (s.size() == 1 ? ",)" : ")");
      };
      Bad(std::string("state array '") + name + "' has shape " + text_of(a.shape) +
          ", this model needs " + text_of(shape) + ".");
    }
    v[name] = Doubles(name, a);
    // Checked as the memory will hold it: 1e300 is finite in float64 and
    // infinite once stored in a float32 array.
    const bool as_float32 = f32.count(name) > 0;
    if (as_float32) {
      std::vector<float>& stored = f32[name];
      stored.assign(v[name].begin(), v[name].end());  // astype(float32)
      for (float x : stored) {
        if (!std::isfinite(x)) {
          Bad(std::string("state array '") + name + "' holds non-finite values (as float32).");
        }
      }
    } else {
      for (double x : v[name]) {
        if (!std::isfinite(x)) {
          Bad(std::string("state array '") + name + "' holds non-finite values (as float64).");
        }
      }
    }
  }
  const CachePolicy& p = policy_;
  const int64_t capacity = Int(v["capacity"][0]);
  if (!(p.min_hot <= capacity && capacity <= std::max(p.min_hot, p.max_hot))) {
    Bad("capacity " + std::to_string(capacity) + " is outside [" + std::to_string(p.min_hot) +
        ", " + std::to_string(p.max_hot) + "].");
  }
  std::vector<int64_t> count(static_cast<size_t>(S)), next(static_cast<size_t>(S));
  const std::vector<double>& classes = v["inst_class"];
  for (size_t s = 0; s < size_t(S); ++s) {
    count[s] = Int(v["inst_pos"][2 * s]);
    next[s] = Int(v["inst_pos"][2 * s + 1]);
    bool fits = 0 <= count[s] && count[s] <= slots_ && 0 <= next[s] && next[s] < m_slots;
    for (int64_t j = 0; fits && j < count[s]; ++j) {
      double c = classes[s * size_t(m_slots) + size_t(j)];
      fits = c >= 0 && c < double(K);
    }
    if (!fits) Bad("the short-term tier's slots do not fit this model.");
  }
  // The tier holds unit-norm semantic vectors (or zero rows): a longer one
  // would match any frame above the instance threshold.
  const std::vector<float>& inst = f32["inst"];
  RowNormsAtMost(inst, size_t(S * m_slots), size_t(D), static_cast<float>(1.0 + 1e-4),
                 "the short-term tier holds vectors longer than 1.");
  const double top = 1.0 / (1.0 - p.decay) + 1e-6;
  for (double s : v["scores"]) {
    if (s < 0 || s > top) {
      char b[32];
      std::snprintf(b, sizeof b, "%.6g", top);
      Bad(std::string("class scores must be in [0, ") + b + "].");
    }
  }
  for (const char* name : {"answers", "left_out"}) {
    for (double x : v[name]) {
      if (x > double(p.window)) {
        Bad("answer and left-out counts exceed the window (" + std::to_string(p.window) + ").");
      }
    }
  }
  for (double x : v["counters"]) {
    if (x > double(kMaxCount)) Bad("exit counters must be <= " + std::to_string(kMaxCount) + ".");
  }
  const int64_t frame_in_window = Int(v["frame_in_window"][0]);
  if (!(0 <= frame_in_window && frame_in_window < p.window)) {
    Bad("frame_in_window " + std::to_string(frame_in_window) + " is outside [0, " +
        std::to_string(p.window) + ").");
  }
  for (const char* name : {"answers", "left_out", "counters"}) {
    for (double x : v[name]) {
      if (x < 0) Bad("answer, left-out and exit counters must be >= 0.");
    }
  }
  const std::vector<float>& offsets = f32["offsets"];
  RowNormsAtMost(offsets, size_t(S * K), size_t(D), static_cast<float>(p.max_drift + 1e-4),
                 "an adapted centre lies further than max_drift from its original.");
  // Every check passed: restore.
  scores_.assign(v["scores"].begin(), v["scores"].end());
  for (size_t c = 0; c < size_t(K); ++c) hot_[c] = v["hot"][c] != 0.0;
  capacity_ = capacity;
  frame_in_window_ = frame_in_window;
  for (size_t c = 0; c < size_t(K); ++c) {
    left_out_[c] = Int(v["left_out"][c]);
    answers_[c] = Int(v["answers"][c]);
  }
  inst_ = inst;
  for (size_t i = 0; i < inst_class_.size(); ++i) inst_class_[i] = Int(classes[i]);
  inst_count_ = count;
  inst_next_ = next;
  const std::vector<double>& counters = v["counters"];
  exits_ = Int(counters[0]);
  checks_ = Int(counters[1]);
  disagreements_ = Int(counters[2]);
  reverts_ = Int(counters[3]);
  exit_run_ = Int(counters[4]);
  RevertCentres();
  const size_t D_ = size_t(D);
  for (size_t c = 0; c < size_t(K); ++c) {
    if (v["adapted"][c] == 0.0) continue;
    for (size_t s = 0; s < size_t(S); ++s) {
      const size_t at = (s * size_t(K) + c) * D_;
      std::copy(offsets.begin() + at, offsets.begin() + at + D_, offsets_.begin() + at);
    }
    Renormalise(int(c));
  }
  Refresh();
}

}  // namespace smtm
