// The native SMTM runtime: the port of smtm_tf/runtime/host.py SmtmRuntime.
// It reads the descriptor embedded in an SMTM .tflite, checks it against the
// graph, and classifies frames with early exits making exactly the Python
// runtime's decisions (classify_fast), with the same adaptive memory
// (smtm::Memory) and state files.
#ifndef SMTM_NATIVE_SRC_RUNTIME_H_
#define SMTM_NATIVE_SRC_RUNTIME_H_

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "session.h"
#include "smtm/descriptor.h"
#include "smtm/error.h"
#include "smtm/memory.h"

namespace smtm {

struct RuntimeOptions {
  litert::Accelerator accelerator = litert::Accelerator::kCpu;
  int cpu_threads = 1;
  bool strict = true;  // GPU: every op on the GPU.
};

struct FrameResult {
  int class_id;
  int exit_stage;  // Stage index, or num_stages() when the head ran.
};

class Runtime {
 public:
  // Throws Error: kModelFile (not an SMTM .tflite, damaged, descriptor
  // malformed or not the graph's), kBackend (the accelerator cannot run it),
  // kArgument (bad options).
  Runtime(const uint8_t* model, size_t size, const RuntimeOptions& options = {});

  // Classifies one frame of pixels (float32, the model's input shape with or
  // without its batch axis: `size` floats in H, W, C order). Throws kArgument
  // for a frame of another size, kFrame for non-finite pixels or outputs
  // (nothing of such a frame reaches the memory).
  FrameResult Classify(const float* frame, size_t size);
  // The full model's class (no exits, no memory).
  int ClassifyFull(const float* frame, size_t size);
  // Forgets the stream: cache, short-term tier, adapted centres.
  void Reset();
  // Switches to another exit rule and cache policy (host.py set_exit_rule),
  // given as JSON in the descriptor's schema: {"exit_rule": {...}, "cache":
  // {...} or null} (smtm::RuleChoice). Starts a fresh memory; the model's
  // centres are kept. Throws kArgument (naming the field) for a rule that
  // does not parse or does not fit the model; the current rule then stays.
  void SetExitRule(std::string_view rule_json);
  // Writes the memory's state atomically. Throws kState / kIo.
  void SaveState(const std::string& path) const;
  // Restores a state written by SaveState (here or by the Python runtime).
  // A missing, corrupted or mismatched file leaves a fresh memory and returns
  // false, with the reason in `why` if given.
  bool LoadState(const std::string& path, std::string* why = nullptr);

  int num_stages() const { return static_cast<int>(stages_.size()); }
  int num_classes() const { return num_classes_; }
  size_t frame_size() const { return frame_size_; }
  const std::vector<int64_t>& input_shape() const { return input_shape_; }
  const Descriptor& descriptor() const { return descriptor_; }
  const Memory& memory() const { return *memory_; }
  // SHA-256 hex of the descriptor's JSON as embedded: what a state is for.
  const std::string& fingerprint() const { return fingerprint_; }
  bool fully_accelerated() const { return session_->FullyAccelerated(); }

  // Bare signature runs on the bound buffers, for host-work measurements.
  void RunStage(int stage) { session_->Run(stages_[stage].signature); }
  void RunHead() { session_->Run(head_); }
  // Nanoseconds spent inside LiteRT's runs since timing was turned on (see
  // litert::Session::set_timing): a frame's host work is its time minus this.
  void set_timing(bool on) { session_->set_timing(on); }
  int64_t model_ns() const { return session_->model_ns(); }

 private:
  struct Stage {
    int signature;
    float* activation_in;
    float* centres_in;
    const float* similarities;
    const float* semantic;
    const float* next_activation;
    size_t activation_floats;
    size_t next_floats;
    size_t centre_floats;  // K * D
    size_t dim;
    bool never;
  };
  void Bind();
  // Copies (preprocesses) a frame into `dst` and refuses a frame of the
  // wrong size or with non-finite pixels.
  void FeedChecked(const float* frame, size_t size, float* dst) const;
  void Feed(const float* frame, float* dst) const;
  // The full model on `frame`, or on what full_in_ holds when null.
  int RunFull(const float* frame);
  void WriteCentres(int class_id = -1);
  // Takes `memory` (the descriptor's rule, or another): each stage's `never`
  // and the centre inputs follow it.
  void UseMemory(std::unique_ptr<Memory> memory);

  RuntimeOptions options_;
  Descriptor descriptor_;
  std::string fingerprint_;
  std::unique_ptr<litert::Session> session_;
  std::unique_ptr<Memory> memory_;
  std::vector<Stage> stages_;
  std::vector<const float*> semantics_;
  int head_ = -1, full_ = -1;
  float* head_in_ = nullptr;
  const float* head_out_ = nullptr;
  float* full_in_ = nullptr;
  const float* full_out_ = nullptr;
  size_t head_in_floats_ = 0;
  int num_classes_ = 0;
  size_t frame_size_ = 0;
  int channels_ = 1;
  bool identity_ = true;
  std::vector<float> scale_, offset_;
  std::vector<int64_t> input_shape_;
};

// Port of host.py check_against_graph: throws Error kModelFile unless the
// graph has exactly the descriptor's signatures and tensors.
void CheckAgainstGraph(const Descriptor& descriptor,
                       const std::vector<litert::SignatureInfo>& graph);

}  // namespace smtm

#endif  // SMTM_NATIVE_SRC_RUNTIME_H_
