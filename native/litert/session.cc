#include "session.h"

#include <dlfcn.h>
#include <stdlib.h>  // realpath

#include <chrono>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iterator>
#include <mutex>
#include <sstream>
#include <utility>

#include "smtm/digest.h"
#include "smtm/error.h"

namespace smtm {
namespace litert {
namespace {

[[noreturn]] void Fail(Error::Code code, const std::string& message) {
  throw Error(code, message);
}

void Check(LiteRtStatus status, Error::Code code, const std::string& what) {
  if (status != kLiteRtStatusOk) {
    Fail(code, "LiteRT: " + what + " failed (LiteRtStatus " +
                   std::to_string(static_cast<int>(status)) + ").");
  }
}

const char* DtypeName(LiteRtElementType type) {
  switch (type) {
    case kLiteRtElementTypeFloat32: return "float32";
    case kLiteRtElementTypeInt32: return "int32";
    case kLiteRtElementTypeUInt8: return "uint8";
    case kLiteRtElementTypeInt64: return "int64";
    case kLiteRtElementTypeBool: return "bool";
    case kLiteRtElementTypeInt16: return "int16";
    case kLiteRtElementTypeInt8: return "int8";
    case kLiteRtElementTypeFloat16: return "float16";
    default: return "unsupported";
  }
}

size_t ElementBytes(LiteRtElementType type) {
  switch (type) {
    case kLiteRtElementTypeInt64: return 8;
    case kLiteRtElementTypeFloat32:
    case kLiteRtElementTypeInt32: return 4;
    case kLiteRtElementTypeInt16:
    case kLiteRtElementTypeFloat16: return 2;
    default: return 1;
  }
}

// An opaque option whose payload is TOML text, the form LiteRT's CPU
// ("xnnpack") and GPU ("gpu_options") accelerators read.
void AddTomlOption(LiteRtOptions options, const char* identifier, const std::string& toml) {
  char* payload = new char[toml.size() + 1];
  std::memcpy(payload, toml.c_str(), toml.size() + 1);
  LiteRtOpaqueOptions opaque = nullptr;
  LiteRtStatus status = LiteRtCreateOpaqueOptions(
      identifier, payload, [](void* p) { delete[] static_cast<char*>(p); }, &opaque);
  if (status != kLiteRtStatusOk) {
    delete[] payload;
    Check(status, Error::Code::kBackend, std::string("creating ") + identifier + " options");
  }
  status = LiteRtAddOpaqueOptions(options, opaque);
  if (status != kLiteRtStatusOk) {
    LiteRtDestroyOpaqueOptions(opaque);
    Check(status, Error::Code::kBackend, std::string("adding ") + identifier + " options");
  }
}

TensorInfo Describe(LiteRtTensor tensor, const char* name, LiteRtRankedTensorType* type,
                    const std::string& where) {
  TensorInfo info;
  info.name = name;
  LiteRtTensorTypeId id;
  Check(LiteRtGetTensorTypeId(tensor, &id), Error::Code::kModelFile, "type of " + where);
  if (id != kLiteRtRankedTensorType) {
    Fail(Error::Code::kModelFile, where + " has no fixed rank; SMTM models have static shapes.");
  }
  Check(LiteRtGetRankedTensorType(tensor, type), Error::Code::kModelFile, "shape of " + where);
  info.dtype = DtypeName(type->element_type);
  size_t elements = 1;
  for (unsigned d = 0; d < type->layout.rank; ++d) {
    int32_t dim = type->layout.dimensions[d];
    info.shape.push_back(dim);
    elements *= dim > 0 ? static_cast<size_t>(dim) : 0;
  }
  info.bytes = elements * ElementBytes(type->element_type);
  return info;
}

// The folder of the loaded libLiteRt.so: LiteRT looks for its GPU
// accelerator library there only when told. Symbolic links resolved: a
// build may link the wheel's file through one (Bazel's @litert does).
std::string LibraryDir() {
  Dl_info info{};
  if (dladdr(reinterpret_cast<void*>(&LiteRtCreateEnvironment), &info) && info.dli_fname) {
    char* real = realpath(info.dli_fname, nullptr);
    std::string path = real ? real : info.dli_fname;
    std::free(real);
    size_t slash = path.rfind('/');
    if (slash != std::string::npos) return path.substr(0, slash);
  }
  return ".";
}

LiteRtEnvironment CreateEnvironment() {
  static const std::string dir = LibraryDir();
  LiteRtEnvOption option{};
  option.tag = kLiteRtEnvOptionTagRuntimeLibraryDir;
  option.value.type = kLiteRtAnyTypeString;
  option.value.str_value = dir.c_str();
  LiteRtEnvironment env = nullptr;
  Check(LiteRtCreateEnvironment(1, &option, &env), Error::Code::kBackend,
        "creating an environment");
  return env;
}

}  // namespace

std::string CheckLibrary() {
  LiteRtEnvironment env = CreateEnvironment();
  std::ostringstream line;
  line << "LiteRT " << kLiteRtVersion << " (" << LibraryDir() << "/libLiteRt.so); accelerators:";
  bool cpu = false;
  LiteRtParamIndex n = 0;
  if (LiteRtGetNumAccelerators(env, &n) == kLiteRtStatusOk) {
    for (LiteRtParamIndex i = 0; i < n; ++i) {
      LiteRtAccelerator acc = nullptr;
      const char* name = "?";
      LiteRtApiVersion v{};
      LiteRtHwAcceleratorSet hw = 0;
      if (LiteRtGetAccelerator(env, i, &acc) != kLiteRtStatusOk) continue;
      LiteRtGetAcceleratorName(acc, &name);
      LiteRtGetAcceleratorVersion(acc, &v);
      LiteRtGetAcceleratorHardwareSupport(acc, &hw);
      // LiteRT 2.3's accelerators implement accelerator API 1.x.
      cpu = cpu || ((hw & kLiteRtHwAcceleratorCpu) && v.major == 1);
      line << " " << name << " " << v.major << "." << v.minor << "." << v.patch;
    }
  }
  LiteRtDestroyEnvironment(env);
  if (!cpu) {
    Fail(Error::Code::kBackend,
         "The loaded libLiteRt has no CPU accelerator of API 1.x: it is not the LiteRT " +
             std::string(kLiteRtVersion) + " library this runtime was built for (" +
             line.str() + ").");
  }
#ifdef SMTM_LITERT_SHA256
  // libLiteRt.so exports no release number: the build pins the exact file.
  std::string path = LibraryDir() + "/libLiteRt.so";
  std::ifstream in(path, std::ios::binary);
  std::vector<char> bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  std::string sha = Sha256Hex(bytes.data(), bytes.size());
  if (sha != SMTM_LITERT_SHA256) {
    Fail(Error::Code::kBackend,
         path + " is not the LiteRT " + kLiteRtVersion + " library this runtime was built "
         "against (SHA-256 " + sha + ", built against " + SMTM_LITERT_SHA256 +
         "): install ai-edge-litert==" + kLiteRtVersion + " or rebuild the runtime.");
  }
  line << "; library SHA-256 as built";
#endif
  return line.str();
}

void CheckLibraryOnce() {
  static std::once_flag once;
  static std::string failure;
  std::call_once(once, [] {
    try {
      CheckLibrary();
    } catch (const Error& e) {
      failure = e.what();
    }
  });
  if (!failure.empty()) Fail(Error::Code::kBackend, failure);
}

Session::Session(const uint8_t* model, size_t size, const SessionOptions& options)
    : options_(options), bytes_(model, model + size) {
  CheckLibraryOnce();
  if (options.cpu_threads < 1) {
    Fail(Error::Code::kArgument,
         "cpu_threads must be >= 1, got " + std::to_string(options.cpu_threads) + ".");
  }
  // LiteRT reads the flatbuffer without verifying it (garbage crashes it), so
  // at least the root table and file identifier are checked here; the runtime
  // parses the metadata with bounds checks (smtm::ReadMetadata) before this.
  uint32_t root = 0;
  if (size >= 8) std::memcpy(&root, model, 4);
  if (size < 8 || std::memcmp(model + 4, "TFL3", 4) != 0 || root < 8 || root >= size) {
    Fail(Error::Code::kModelFile,
         "Not a .tflite model: the bytes lack the TFL3 flatbuffer identifier or root table.");
  }
  try {
    env_ = CreateEnvironment();
    if (LiteRtCreateModelFromBuffer(env_, bytes_.data(), bytes_.size(), &model_) !=
        kLiteRtStatusOk) {
      Fail(Error::Code::kModelFile,
           "LiteRT cannot read the model: it is not a valid .tflite flatbuffer.");
    }
    LiteRtOptions compile = nullptr;
    Check(LiteRtCreateOptions(&compile), Error::Code::kBackend, "creating options");
    try {
      LiteRtHwAcceleratorSet set = kLiteRtHwAcceleratorCpu;
      if (options.accelerator == Accelerator::kCpu) {
        AddTomlOption(compile, "xnnpack",
                      "num_threads = " + std::to_string(options.cpu_threads) + "\n");
      } else {
        set = options.strict ? kLiteRtHwAcceleratorGpu
                             : (kLiteRtHwAcceleratorGpu | kLiteRtHwAcceleratorCpu);
        int precision = options.accelerator == Accelerator::kGpuFp32
                            ? kLiteRtDelegatePrecisionFp32 : kLiteRtDelegatePrecisionFp16;
        AddTomlOption(compile, "gpu_options", "precision = " + std::to_string(precision) + "\n");
      }
      Check(LiteRtSetOptionsHardwareAccelerators(compile, set), Error::Code::kBackend,
            "selecting accelerators");
      LiteRtStatus status = LiteRtCreateCompiledModel(env_, model_, compile, &compiled_);
      if (status != kLiteRtStatusOk) {
        Fail(Error::Code::kBackend,
             std::string("LiteRT cannot compile the model for the ") +
                 (options.accelerator == Accelerator::kCpu ? "CPU" : "GPU") +
                 " (LiteRtStatus " + std::to_string(static_cast<int>(status)) + ")" +
                 (options.accelerator == Accelerator::kCpu ? "."
                      : ": is a GPU (or software Vulkan) driver installed? With strict GPU "
                        "every op must run on the GPU."));
      }
    } catch (...) {
      LiteRtDestroyOptions(compile);
      throw;
    }
    LiteRtDestroyOptions(compile);
    if (options.accelerator != Accelerator::kCpu && options.strict && !FullyAccelerated()) {
      Fail(Error::Code::kBackend,
           "Strict GPU: some of the model's ops do not run on the GPU.");
    }
    LiteRtParamIndex n = 0;
    Check(LiteRtGetNumModelSignatures(model_, &n), Error::Code::kModelFile, "signatures");
    for (LiteRtParamIndex s = 0; s < n; ++s) {
      LiteRtSignature sig = nullptr;
      const char* key = nullptr;
      Check(LiteRtGetModelSignature(model_, s, &sig), Error::Code::kModelFile, "signature");
      Check(LiteRtGetSignatureKey(sig, &key), Error::Code::kModelFile, "signature key");
      SignatureInfo info;
      info.key = key;
      LiteRtParamIndex ni = 0, no = 0;
      Check(LiteRtGetNumSignatureInputs(sig, &ni), Error::Code::kModelFile, "inputs");
      Check(LiteRtGetNumSignatureOutputs(sig, &no), Error::Code::kModelFile, "outputs");
      for (LiteRtParamIndex i = 0; i < ni; ++i) {
        const char* name = nullptr;
        LiteRtTensor t = nullptr;
        LiteRtRankedTensorType type{};
        Check(LiteRtGetSignatureInputName(sig, i, &name), Error::Code::kModelFile, "input");
        Check(LiteRtGetSignatureInputTensorByIndex(sig, i, &t), Error::Code::kModelFile,
              "input");
        info.inputs.push_back(Describe(t, name, &type, info.key + " input " + name));
      }
      for (LiteRtParamIndex i = 0; i < no; ++i) {
        const char* name = nullptr;
        LiteRtTensor t = nullptr;
        LiteRtRankedTensorType type{};
        Check(LiteRtGetSignatureOutputName(sig, i, &name), Error::Code::kModelFile, "output");
        Check(LiteRtGetSignatureOutputTensorByIndex(sig, i, &t), Error::Code::kModelFile,
              "output");
        info.outputs.push_back(Describe(t, name, &type, info.key + " output " + name));
      }
      signatures_.push_back(std::move(info));
    }
    bound_.resize(signatures_.size());
    for (size_t s = 0; s < signatures_.size(); ++s) Bind(static_cast<int>(s));
  } catch (...) {
    Release();
    throw;
  }
}

Session::~Session() { Release(); }

void Session::Release() {
  for (Bound& b : bound_) {
    for (Buffer& buf : b.inputs) if (buf.handle) LiteRtDestroyTensorBuffer(buf.handle);
    for (Buffer& buf : b.outputs) if (buf.handle) LiteRtDestroyTensorBuffer(buf.handle);
    b.inputs.clear();
    b.outputs.clear();
  }
  bound_.clear();
  if (compiled_) LiteRtDestroyCompiledModel(compiled_);
  compiled_ = nullptr;
  if (model_) LiteRtDestroyModel(model_);
  model_ = nullptr;
  if (env_) LiteRtDestroyEnvironment(env_);
  env_ = nullptr;
}

Session::Buffer Session::MakeBuffer(const LiteRtRankedTensorType& type,
                                    LiteRtTensorBufferRequirements requirements,
                                    const std::string& what) {
  Buffer buf;
  Check(LiteRtCreateManagedTensorBufferFromRequirements(env_, &type, requirements, &buf.handle),
        Error::Code::kBackend, "creating the buffer of " + what);
  LiteRtTensorBufferType kind = kLiteRtTensorBufferTypeUnknown;
  Check(LiteRtGetTensorBufferType(buf.handle, &kind), Error::Code::kBackend,
        "buffer type of " + what);
  Check(LiteRtGetTensorBufferSize(buf.handle, &buf.bytes), Error::Code::kBackend,
        "buffer size of " + what);
  buf.host_memory = kind == kLiteRtTensorBufferTypeHostMemory;
  if (buf.host_memory) {
    // Host memory stays where it is: lock once for its address.
    Check(LiteRtLockTensorBuffer(buf.handle, &buf.host, kLiteRtTensorBufferLockModeReadWrite),
          Error::Code::kBackend, "locking the buffer of " + what);
    std::memset(buf.host, 0, buf.bytes);
    LiteRtUnlockTensorBuffer(buf.handle);
  } else {
    buf.shadow.assign(buf.bytes, 0);
    buf.host = buf.shadow.data();
  }
  return buf;
}

void Session::Bind(int s) {
  LiteRtSignature sig = nullptr;
  Check(LiteRtGetModelSignature(model_, s, &sig), Error::Code::kModelFile, "signature");
  Bound& b = bound_[s];
  const SignatureInfo& info = signatures_[s];
  for (size_t i = 0; i < info.inputs.size(); ++i) {
    LiteRtTensor t = nullptr;
    LiteRtRankedTensorType type{};
    LiteRtTensorBufferRequirements req = nullptr;
    Check(LiteRtGetSignatureInputTensorByIndex(sig, i, &t), Error::Code::kModelFile, "input");
    Check(LiteRtGetRankedTensorType(t, &type), Error::Code::kModelFile, "input type");
    std::string what = info.key + " input " + info.inputs[i].name;
    Check(LiteRtGetCompiledModelInputBufferRequirements(compiled_, s, i, &req),
          Error::Code::kBackend, "buffer requirements of " + what);
    b.inputs.push_back(MakeBuffer(type, req, what));
    b.in_handles.push_back(b.inputs.back().handle);
  }
  for (size_t i = 0; i < info.outputs.size(); ++i) {
    LiteRtTensor t = nullptr;
    LiteRtRankedTensorType type{};
    LiteRtTensorBufferRequirements req = nullptr;
    Check(LiteRtGetSignatureOutputTensorByIndex(sig, i, &t), Error::Code::kModelFile, "output");
    Check(LiteRtGetRankedTensorType(t, &type), Error::Code::kModelFile, "output type");
    std::string what = info.key + " output " + info.outputs[i].name;
    Check(LiteRtGetCompiledModelOutputBufferRequirements(compiled_, s, i, &req),
          Error::Code::kBackend, "buffer requirements of " + what);
    b.outputs.push_back(MakeBuffer(type, req, what));
    b.out_handles.push_back(b.outputs.back().handle);
  }
}

std::optional<std::string_view> Session::Metadata(const char* name) const {
  const void* data = nullptr;
  size_t size = 0;
  if (LiteRtGetModelMetadata(model_, name, &data, &size) != kLiteRtStatusOk || !data) {
    return std::nullopt;
  }
  return std::string_view(static_cast<const char*>(data), size);
}

int Session::SignatureIndex(std::string_view key) const {
  for (size_t s = 0; s < signatures_.size(); ++s) {
    if (signatures_[s].key == key) return static_cast<int>(s);
  }
  return -1;
}

float* Session::Find(int s, std::string_view name, bool input) const {
  if (s < 0 || static_cast<size_t>(s) >= signatures_.size()) {
    Fail(Error::Code::kArgument, "No signature index " + std::to_string(s) + ".");
  }
  const auto& tensors = input ? signatures_[s].inputs : signatures_[s].outputs;
  for (size_t i = 0; i < tensors.size(); ++i) {
    if (tensors[i].name != name) continue;
    if (tensors[i].dtype != "float32") {
      Fail(Error::Code::kModelFile, "Signature '" + signatures_[s].key + "' " +
                                        (input ? "input '" : "output '") + std::string(name) +
                                        "' is " + tensors[i].dtype + ", not float32.");
    }
    Buffer& buf = input ? bound_[s].inputs[i] : bound_[s].outputs[i];
    return static_cast<float*>(buf.host);
  }
  Fail(Error::Code::kModelFile, "Signature '" + signatures_[s].key + "' has no " +
                                    (input ? "input '" : "output '") + std::string(name) + "'.");
}

float* Session::Input(int s, std::string_view name) { return Find(s, name, true); }

bool Session::Chain(int from, std::string_view output, int to, std::string_view input) {
  Find(from, output, false);  // Throws for a missing or non-float32 tensor.
  Find(to, input, true);
  auto index = [](const std::vector<TensorInfo>& tensors, std::string_view name) {
    size_t i = 0;
    while (tensors[i].name != name) ++i;
    return i;
  };
  size_t o = index(signatures_[from].outputs, output);
  size_t i = index(signatures_[to].inputs, input);
  Buffer& out = bound_[from].outputs[o];
  Buffer& in = bound_[to].inputs[i];
  if (!out.host_memory || !in.host_memory || out.bytes != in.bytes) return false;
  // `in` keeps owning its own buffer (released with the session); runs use `out`.
  in.host = out.host;
  bound_[to].in_handles[i] = out.handle;
  return true;
}

const float* Session::Output(int s, std::string_view name) const {
  return Find(s, name, false);
}

void Session::Sync(Buffer& buf, bool to_device) {
  if (buf.host_memory) return;
  void* addr = nullptr;
  Check(LiteRtLockTensorBuffer(buf.handle, &addr,
                               to_device ? kLiteRtTensorBufferLockModeWrite
                                         : kLiteRtTensorBufferLockModeRead),
        Error::Code::kBackend, "locking a device buffer");
  if (to_device) {
    std::memcpy(addr, buf.shadow.data(), buf.bytes);
  } else {
    std::memcpy(buf.shadow.data(), addr, buf.bytes);
  }
  LiteRtUnlockTensorBuffer(buf.handle);
}

void Session::Run(int s) {
  Bound& b = bound_[s];
  for (Buffer& buf : b.inputs) Sync(buf, true);
  using Clock = std::chrono::steady_clock;
  const Clock::time_point start = timing_ ? Clock::now() : Clock::time_point();
  LiteRtStatus status = LiteRtRunCompiledModel(compiled_, s, b.in_handles.size(),
                                               b.in_handles.data(), b.out_handles.size(),
                                               b.out_handles.data());
  if (timing_) {
    model_ns_ += std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now() - start)
                     .count();
  }
  if (status != kLiteRtStatusOk) {
    Fail(Error::Code::kBackend, "LiteRT: running signature '" + signatures_[s].key +
                                    "' failed (LiteRtStatus " +
                                    std::to_string(static_cast<int>(status)) + ").");
  }
  for (Buffer& buf : b.outputs) Sync(buf, false);
}

bool Session::FullyAccelerated() const {
  bool fully = false;
  if (LiteRtCompiledModelIsFullyAccelerated(compiled_, &fully) != kLiteRtStatusOk) return false;
  return fully;
}

}  // namespace litert
}  // namespace smtm
