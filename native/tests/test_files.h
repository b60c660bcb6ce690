// What the native tests read: the exported golden folder and whole files.
#ifndef SMTM_NATIVE_TESTS_TEST_FILES_H_
#define SMTM_NATIVE_TESTS_TEST_FILES_H_

#include <cstdint>
#include <cstdlib>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

namespace smtm {
namespace testing_files {

// SMTM_GOLDEN_DIR (scripts/golden_traces.py --export_dir=DIR), or "" when unset.
inline std::string GoldenDir() {
  const char* dir = std::getenv("SMTM_GOLDEN_DIR");
  return dir ? dir : "";
}

// The file's bytes; empty when it cannot be read.
inline std::vector<uint8_t> ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::vector<uint8_t>((std::istreambuf_iterator<char>(in)),
                              std::istreambuf_iterator<char>());
}

// The stream kinds of a golden export (stream_kinds.txt, one per line);
// empty when the file cannot be read.
inline std::vector<std::string> GoldenKinds() {
  std::ifstream in(GoldenDir() + "/stream_kinds.txt");
  std::vector<std::string> kinds;
  for (std::string line; std::getline(in, line);) {
    if (!line.empty()) kinds.push_back(line);
  }
  return kinds;
}

}  // namespace testing_files
}  // namespace smtm

#endif  // SMTM_NATIVE_TESTS_TEST_FILES_H_
