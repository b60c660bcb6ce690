// Helpers shared by smtm_core's tests: fixture files and .npz arrays.
#ifndef SMTM_CORE_TESTS_TEST_UTIL_H_
#define SMTM_CORE_TESTS_TEST_UTIL_H_

#include <unistd.h>

#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "npz.h"

namespace smtm::testing {

inline std::string ReadFile(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw std::runtime_error("cannot read " + path);
  std::ostringstream s;
  s << f.rdbuf();
  return s.str();
}

inline std::string DataPath(const std::string& name) {
  return std::string(SMTM_CORE_TESTDATA) + "/" + name;
}

inline std::map<std::string, internal::NpyArray> ReadArrays(const std::string& path) {
  std::map<std::string, internal::NpyArray> out;
  for (auto& [k, v] : internal::ReadNpz(ReadFile(path))) out[k] = v;
  return out;
}

// The values of a C-order array stored as `descr`, e.g. Values<float>(a, "<f4").
template <typename T>
std::vector<T> Values(const internal::NpyArray& a, const std::string& descr) {
  if (a.descr != descr || a.fortran_order) {
    throw std::runtime_error("array is " + a.descr + ", expected " + descr);
  }
  std::vector<T> v(a.data.size() / sizeof(T));
  std::memcpy(v.data(), a.data.data(), v.size() * sizeof(T));
  return v;
}

// A fresh path under the test's temporary folder.
inline std::string TempPath(const std::string& name) {
  const char* dir = std::getenv("TEST_TMPDIR");
  std::string base = dir ? dir : "/tmp";
  return base + "/smtm_core_test_" + std::to_string(::getpid()) + "_" + name;
}

}  // namespace smtm::testing

#endif  // SMTM_CORE_TESTS_TEST_UTIL_H_
