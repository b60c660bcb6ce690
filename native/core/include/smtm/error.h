// Errors of the native SMTM runtime: every failure is an smtm::Error.
#ifndef SMTM_ERROR_H_
#define SMTM_ERROR_H_

#include <stdexcept>
#include <string>

namespace smtm {

class Error : public std::runtime_error {
 public:
  enum class Code {
    kModelFile = 1,  // The model file cannot be run as it is (descriptor, flatbuffer, graph).
    kFrame = 2,      // A frame (or the model's output for it) is not finite.
    kState = 3,      // A saved memory state is missing, corrupted or for another model.
    kBackend = 4,    // The execution backend is unavailable or failed.
    kArgument = 5,   // A caller passed an argument out of range.
    kIo = 6,         // A file could not be read or written.
  };

  Error(Code code, const std::string& message) : std::runtime_error(message), code_(code) {}

  Code code() const noexcept { return code_; }

 private:
  Code code_;
};

}  // namespace smtm

#endif  // SMTM_ERROR_H_
