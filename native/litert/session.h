// A LiteRT compiled model with one set of tensor buffers per signature,
// created once: per frame the runtime writes inputs and reads outputs through
// host pointers and runs signatures, with no allocation or lookup.
#ifndef SMTM_NATIVE_LITERT_SESSION_H_
#define SMTM_NATIVE_LITERT_SESSION_H_

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "litert_c_api.h"

namespace smtm {
namespace litert {

// The LiteRT release whose C API litert_c_api.h declares.
inline constexpr const char* kLiteRtVersion = "2.3.0";

enum class Accelerator { kCpu, kGpuFp32, kGpuFp16 };

struct SessionOptions {
  Accelerator accelerator = Accelerator::kCpu;
  int cpu_threads = 1;  // CPU only.
  // GPU only: fail unless every op runs on the GPU (else ops may fall back
  // to the CPU).
  bool strict = true;
};

struct TensorInfo {
  std::string name;
  std::vector<int64_t> shape;
  std::string dtype;  // numpy's name: float32, int32, ...
  size_t bytes = 0;
};

struct SignatureInfo {
  std::string key;
  std::vector<TensorInfo> inputs, outputs;
};

// Checks that the loaded libLiteRt is the one this runtime was built for: an
// environment can be created, the CPU accelerator of API 1.x is registered,
// and (builds against the Python wheel, SMTM_LITERT_SHA256) the file's SHA-256
// is the one seen at build time. Returns a line naming the accelerators.
// Throws smtm::Error kBackend. Sessions run it once per process.
std::string CheckLibrary();
void CheckLibraryOnce();

class Session {
 public:
  // Copies `model` (LiteRT keeps referring to the bytes). Throws smtm::Error:
  // kModelFile when LiteRT cannot read the model, kBackend when the
  // accelerator cannot compile it.
  Session(const uint8_t* model, size_t size, const SessionOptions& options);
  ~Session();
  Session(const Session&) = delete;
  Session& operator=(const Session&) = delete;

  const std::vector<uint8_t>& model_bytes() const { return bytes_; }
  // The metadata entry `name`, or nullopt if the model has none.
  std::optional<std::string_view> Metadata(const char* name) const;
  const std::vector<SignatureInfo>& signatures() const { return signatures_; }
  // Index of signature `key`, or -1.
  int SignatureIndex(std::string_view key) const;
  // Host memory of a signature's input / output (float32 tensors only);
  // throws kModelFile naming the signature and tensor when it is missing or
  // not float32.
  float* Input(int signature, std::string_view name);
  const float* Output(int signature, std::string_view name) const;
  // Makes signature `to`'s input `input` the very buffer of signature
  // `from`'s output `output`, so one run reads what the other wrote without a
  // copy (Input(to, input) then returns Output(from, output)). Only host
  // memory buffers of the same size are chained; returns false (changing
  // nothing) otherwise.
  bool Chain(int from, std::string_view output, int to, std::string_view input);
  // Runs a signature on its buffers. Throws kBackend.
  void Run(int signature);
  bool FullyAccelerated() const;
  Accelerator accelerator() const { return options_.accelerator; }
  // Measurements: while timing is on, Run adds the nanoseconds LiteRT spent
  // running (LiteRtRunCompiledModel alone) to model_ns(). Off by default: no
  // clock is read.
  void set_timing(bool on) { timing_ = on; }
  int64_t model_ns() const { return model_ns_; }

 private:
  struct Buffer {
    LiteRtTensorBuffer handle = nullptr;
    void* host = nullptr;          // Host pointer, valid for the session.
    bool host_memory = false;      // Else `shadow` is copied in/out around runs.
    std::vector<uint8_t> shadow;
    size_t bytes = 0;
  };
  struct Bound {
    std::vector<Buffer> inputs, outputs;
    std::vector<LiteRtTensorBuffer> in_handles, out_handles;
  };
  void Bind(int signature);
  void Release();
  Buffer MakeBuffer(const LiteRtRankedTensorType& type,
                    LiteRtTensorBufferRequirements requirements, const std::string& what);
  static void Sync(Buffer& buffer, bool to_device);
  float* Find(int signature, std::string_view name, bool input) const;

  SessionOptions options_;
  bool timing_ = false;
  int64_t model_ns_ = 0;
  std::vector<uint8_t> bytes_;
  LiteRtEnvironment env_ = nullptr;
  LiteRtModel model_ = nullptr;
  LiteRtCompiledModel compiled_ = nullptr;
  std::vector<SignatureInfo> signatures_;
  std::vector<LiteRtRankedTensorType> in_types_flat_;
  mutable std::vector<Bound> bound_;
};

}  // namespace litert
}  // namespace smtm

#endif  // SMTM_NATIVE_LITERT_SESSION_H_
