#include <exception>
#include <new>
#include <string>

#include "runtime.h"
#include "smtm_runtime.h"

struct smtm_runtime {
  smtm::Runtime impl;
  smtm_runtime(const uint8_t* model, size_t size, const smtm::RuntimeOptions& options)
      : impl(model, size, options) {}
};

namespace {

thread_local std::string last_error;

smtm_status Report(smtm_status status, const std::string& message) {
  last_error = message;
  return status;
}

// Runs `body`, turning every exception into a status and message.
template <typename F>
smtm_status Guard(F&& body) {
  try {
    body();
    last_error.clear();
    return SMTM_OK;
  } catch (const smtm::Error& e) {
    return Report(static_cast<smtm_status>(static_cast<int>(e.code())), e.what());
  } catch (const std::bad_alloc&) {
    return Report(SMTM_ERROR_INTERNAL, "Out of memory.");
  } catch (const std::exception& e) {
    return Report(SMTM_ERROR_INTERNAL, e.what());
  } catch (...) {
    return Report(SMTM_ERROR_INTERNAL, "Unknown failure.");
  }
}

smtm_status Null(const char* what) {
  return Report(SMTM_ERROR_ARGUMENT, std::string(what) + " is NULL.");
}

}  // namespace

extern "C" {

smtm_options smtm_default_options(void) { return smtm_options{SMTM_BACKEND_CPU, 1, 1}; }

smtm_status smtm_create(const void* model, size_t size, const smtm_options* options,
                        smtm_runtime** out) {
  if (!out) return Null("out");
  *out = nullptr;
  if (!model) return Null("model");
  smtm_options o = options ? *options : smtm_default_options();
  smtm::RuntimeOptions ro;
  switch (o.backend) {  // An int: C callers may pass any value.
    case SMTM_BACKEND_CPU: ro.accelerator = smtm::litert::Accelerator::kCpu; break;
    case SMTM_BACKEND_GPU_FP32: ro.accelerator = smtm::litert::Accelerator::kGpuFp32; break;
    case SMTM_BACKEND_GPU_FP16: ro.accelerator = smtm::litert::Accelerator::kGpuFp16; break;
    default:
      return Report(SMTM_ERROR_ARGUMENT,
                    "Unknown backend " + std::to_string(o.backend) +
                        " (SMTM_BACKEND_CPU, _GPU_FP32 or _GPU_FP16).");
  }
  ro.cpu_threads = o.cpu_threads;
  ro.strict = o.strict != 0;
  return Guard([&] { *out = new smtm_runtime(static_cast<const uint8_t*>(model), size, ro); });
}

void smtm_destroy(smtm_runtime* runtime) { delete runtime; }

smtm_status smtm_classify(smtm_runtime* runtime, const float* frame, size_t size,
                          int* class_id, int* exit_stage) {
  if (!runtime) return Null("runtime");
  if (!frame) return Null("frame");
  if (!class_id || !exit_stage) return Null("class_id/exit_stage");
  return Guard([&] {
    smtm::FrameResult r = runtime->impl.Classify(frame, size);
    *class_id = r.class_id;
    *exit_stage = r.exit_stage;
  });
}

smtm_status smtm_classify_full(smtm_runtime* runtime, const float* frame, size_t size,
                               int* class_id) {
  if (!runtime) return Null("runtime");
  if (!frame) return Null("frame");
  if (!class_id) return Null("class_id");
  return Guard([&] { *class_id = runtime->impl.ClassifyFull(frame, size); });
}

smtm_status smtm_reset(smtm_runtime* runtime) {
  if (!runtime) return Null("runtime");
  return Guard([&] { runtime->impl.Reset(); });
}

smtm_status smtm_set_exit_rule(smtm_runtime* runtime, const char* rule_json) {
  if (!runtime) return Null("runtime");
  if (!rule_json) return Null("rule_json");
  return Guard([&] { runtime->impl.SetExitRule(rule_json); });
}

smtm_status smtm_save_state(smtm_runtime* runtime, const char* path) {
  if (!runtime) return Null("runtime");
  if (!path) return Null("path");
  return Guard([&] { runtime->impl.SaveState(path); });
}

smtm_status smtm_load_state(smtm_runtime* runtime, const char* path, int* restored) {
  if (!runtime) return Null("runtime");
  if (!path) return Null("path");
  if (!restored) return Null("restored");
  std::string why;
  smtm_status status = Guard([&] { *restored = runtime->impl.LoadState(path, &why) ? 1 : 0; });
  if (status == SMTM_OK && !*restored) last_error = "Memory state " + std::string(path) +
                                                    " not used (" + why + "); starting fresh.";
  return status;
}

smtm_status smtm_counters_get(const smtm_runtime* runtime, smtm_counters* out) {
  if (!runtime) return Null("runtime");
  if (!out) return Null("out");
  return Guard([&] {
    const smtm::Memory& m = runtime->impl.memory();
    out->exits = m.exits();
    out->checks = m.checks();
    out->disagreements = m.disagreements();
    out->reverts = m.reverts();
    out->last_hit = m.last_hit() ? 1 : 0;
  });
}

int smtm_num_stages(const smtm_runtime* runtime) {
  return runtime ? runtime->impl.num_stages() : -1;
}

int smtm_num_classes(const smtm_runtime* runtime) {
  return runtime ? runtime->impl.num_classes() : -1;
}

size_t smtm_frame_size(const smtm_runtime* runtime) {
  return runtime ? runtime->impl.frame_size() : 0;
}

const char* smtm_last_error(void) { return last_error.c_str(); }

}  // extern "C"
