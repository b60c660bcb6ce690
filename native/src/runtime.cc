#include "runtime.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <map>
#include <regex>
#include <sstream>
#include <utility>

#include "smtm/digest.h"
#include "smtm/preprocessing.h"

namespace smtm {
namespace {

[[noreturn]] void Fail(Error::Code code, const std::string& message) {
  throw Error(code, message);
}

// numpy's max: NaN if any element is NaN.
float MaxOf(const float* x, size_t n) {
  float best = -std::numeric_limits<float>::infinity();
  for (size_t i = 0; i < n; ++i) {
    if (std::isnan(x[i])) return x[i];
    if (x[i] > best) best = x[i];
  }
  return best;
}

// numpy's argmax: the first maximum (the first NaN if any).
int ArgMax(const float* x, size_t n) {
  size_t best = 0;
  for (size_t i = 0; i < n; ++i) {
    if (std::isnan(x[i])) return static_cast<int>(i);
    if (x[i] > x[best]) best = i;
  }
  return static_cast<int>(best);
}

size_t Floats(const std::vector<int64_t>& shape) {
  size_t n = 1;
  for (int64_t d : shape) n *= static_cast<size_t>(d);
  return n;
}

// Python's repr of a list of str: ['a', 'b'].
std::string PyList(const std::vector<std::string>& items) {
  std::string out = "[";
  for (size_t i = 0; i < items.size(); ++i) out += (i ? ", '" : "'") + items[i] + "'";
  return out + "]";
}

using TensorMap = std::map<std::string, std::pair<std::vector<int64_t>, std::string>>;

// host.py _tensor_list: "name [d0, d1] dtype, ..." sorted by name.
std::string TensorList(const TensorMap& tensors) {
  std::string out;
  for (const auto& [name, spec] : tensors) {
    if (!out.empty()) out += ", ";
    out += name + " [";
    for (size_t i = 0; i < spec.first.size(); ++i) {
      out += (i ? ", " : "") + std::to_string(spec.first[i]);
    }
    out += "] " + spec.second;
  }
  return out;
}

template <typename Spec>
TensorMap DescriptorTensors(const std::vector<Spec>& specs) {
  TensorMap out;
  for (const auto& t : specs) {
    out[t.name] = {std::vector<int64_t>(t.shape.begin(), t.shape.end()), t.dtype};
  }
  return out;
}

TensorMap GraphTensors(const std::vector<litert::TensorInfo>& tensors) {
  TensorMap out;
  for (const auto& t : tensors) out[t.name] = {t.shape, t.dtype};
  return out;
}

}  // namespace

void CheckAgainstGraph(const Descriptor& d, const std::vector<litert::SignatureInfo>& graph) {
  std::vector<std::pair<std::string, const SignatureSpec*>> specs;
  for (size_t s = 0; s < d.stages.size(); ++s) {
    specs.emplace_back("stages[" + std::to_string(s) + "].signature", &d.stages[s].signature);
  }
  specs.emplace_back("head", &d.head);
  specs.emplace_back("full", &d.full);
  std::vector<std::string> keys, named, stage_keys, want_stages;
  static const std::regex stage_key("stage_[0-9]+");
  for (const auto& sig : graph) {
    keys.push_back(sig.key);
    if (std::regex_match(sig.key, stage_key)) stage_keys.push_back(sig.key);
  }
  for (const auto& [field, spec] : specs) named.push_back(spec->key);
  for (const auto& st : d.stages) want_stages.push_back(st.signature.key);
  std::sort(keys.begin(), keys.end());
  std::sort(named.begin(), named.end());
  std::sort(stage_keys.begin(), stage_keys.end());
  std::sort(want_stages.begin(), want_stages.end());
  bool subset = std::all_of(named.begin(), named.end(), [&](const std::string& k) {
    return std::binary_search(keys.begin(), keys.end(), k);
  });
  if (!subset || stage_keys != want_stages) {
    Fail(Error::Code::kModelFile, "The model's signatures are " + PyList(keys) +
                                      "; its descriptor names " + PyList(named) + ".");
  }
  for (const auto& [field, spec] : specs) {
    const litert::SignatureInfo* sig = nullptr;
    for (const auto& g : graph) if (g.key == spec->key) sig = &g;
    for (int io = 0; io < 2; ++io) {
      TensorMap want = DescriptorTensors(io == 0 ? spec->inputs : spec->outputs);
      TensorMap got = GraphTensors(io == 0 ? sig->inputs : sig->outputs);
      if (got != want) {
        Fail(Error::Code::kModelFile,
             field + (io == 0 ? ".inputs" : ".outputs") + ": the descriptor lists " +
                 TensorList(want) + ", the graph's signature '" + spec->key + "' has " +
                 TensorList(got) + ".");
      }
    }
  }
}

Runtime::Runtime(const uint8_t* model, size_t size, const RuntimeOptions& options)
    : options_(options) {
  // The descriptor and digest are read with bounds checks before LiteRT sees
  // the bytes (LiteRT does not verify a flatbuffer).
  // The integrity record (smtm_digest) as host.py checks it: a file without
  // one (converted before records existed) loads unchecked.
  std::optional<std::string> raw;
  DigestStatus digest = DigestStatus::kAbsent;
  try {
    raw = ReadMetadata(model, size, kDescriptorName);
    digest = CheckDigest(model, size);
  } catch (const Error& e) {
    if (e.code() != Error::Code::kModelFile) throw;
    Fail(Error::Code::kModelFile, std::string("Not a .tflite flatbuffer (") + e.what() + ").");
  }
  if (digest == DigestStatus::kMismatch) {
    Fail(Error::Code::kModelFile,
         "The model file is damaged: its SHA-256 is not the one stored at conversion "
         "(smtm_digest). Download or convert it again.");
  }
  if (!raw) {
    Fail(Error::Code::kModelFile,
         "The model has no 'smtm_descriptor' metadata: it is a plain .tflite, not one made by "
         "smtm_tf's converter. Convert it with scripts/convert.py.");
  }
  descriptor_ = Descriptor::Parse(*raw);
  fingerprint_ = Sha256Hex(raw->data(), raw->size());
  litert::SessionOptions so;
  so.accelerator = options.accelerator;
  so.cpu_threads = options.cpu_threads;
  so.strict = options.strict;
  session_ = std::make_unique<litert::Session>(model, size, so);
  std::optional<std::string_view> seen = session_->Metadata(kDescriptorName);
  if (!seen || *seen != *raw) {
    Fail(Error::Code::kModelFile,
         "LiteRT reads another descriptor than the file's metadata table holds.");
  }
  CheckAgainstGraph(descriptor_, session_->signatures());
  Bind();
}

void Runtime::Bind() {
  litert::Session& s = *session_;
  num_classes_ = descriptor_.num_classes();
  identity_ = descriptor_.preprocessing.IsIdentity();
  input_shape_.assign(descriptor_.full.inputs[0].shape.begin(),
                      descriptor_.full.inputs[0].shape.end());
  frame_size_ = Floats(input_shape_);
  channels_ = static_cast<int>(input_shape_.back());
  descriptor_.preprocessing.Arrays(channels_, &scale_, &offset_);
  std::vector<const float*> centres;
  for (const auto& spec : descriptor_.stages) {
    Stage st{};
    st.signature = s.SignatureIndex(spec.signature.key);
    st.activation_in = s.Input(st.signature, "activation");
    st.centres_in = s.Input(st.signature, "centres");
    st.similarities = s.Output(st.signature, "similarities");
    st.semantic = s.Output(st.signature, "semantic");
    st.next_activation = s.Output(st.signature, "next_activation");
    const auto& sig = s.signatures()[st.signature];
    for (const auto& t : sig.inputs) if (t.name == "activation") st.activation_floats = t.bytes / 4;
    for (const auto& t : sig.inputs) if (t.name == "centres") st.centre_floats = t.bytes / 4;
    for (const auto& t : sig.outputs) if (t.name == "next_activation") st.next_floats = t.bytes / 4;
    stages_.push_back(st);
    semantics_.push_back(st.semantic);
  }
  for (size_t i = 1; i < stages_.size(); ++i) {
    if (stages_[i].activation_floats != stages_[i - 1].next_floats) {
      Fail(Error::Code::kModelFile, "stages[" + std::to_string(i) +
                                        "]: its activation input does not take the previous "
                                        "stage's next_activation.");
    }
  }
  head_ = s.SignatureIndex(descriptor_.head.key);
  full_ = s.SignatureIndex(descriptor_.full.key);
  head_in_ = s.Input(head_, "activation");
  head_out_ = s.Output(head_, "probabilities");
  full_in_ = s.Input(full_, "image");
  full_out_ = s.Output(full_, "probabilities");
  for (const auto& t : s.signatures()[head_].inputs) {
    if (t.name == "activation") head_in_floats_ = t.bytes / 4;
  }
  if (stages_.empty() || head_in_floats_ != stages_.back().next_floats ||
      stages_[0].activation_floats != frame_size_) {
    Fail(Error::Code::kModelFile,
         "The stages do not chain from the full model's input to the head's activation.");
  }
  // Each stage (and the head) reads the previous stage's next_activation in
  // place where both are host memory: no copy between stages (the loop
  // below copies only where a backend keeps them apart).
  for (size_t i = 1; i < stages_.size(); ++i) {
    if (s.Chain(stages_[i - 1].signature, "next_activation", stages_[i].signature,
                "activation")) {
      stages_[i].activation_in = s.Input(stages_[i].signature, "activation");
    }
  }
  if (s.Chain(stages_.back().signature, "next_activation", head_, "activation")) {
    head_in_ = s.Input(head_, "activation");
  }
  for (Stage& st : stages_) st.dim = st.centre_floats / num_classes_;
  UseMemory(std::make_unique<Memory>(descriptor_));
}

void Runtime::UseMemory(std::unique_ptr<Memory> memory) {
  memory_ = std::move(memory);
  for (size_t i = 0; i < stages_.size(); ++i) {
    stages_[i].never = memory_->Never(static_cast<int>(i));
  }
  WriteCentres();
}

void Runtime::WriteCentres(int class_id) {
  for (size_t i = 0; i < stages_.size(); ++i) {
    const Stage& st = stages_[i];
    const float* current = memory_->Centres(static_cast<int>(i));
    if (class_id < 0) {
      std::memcpy(st.centres_in, current, st.centre_floats * sizeof(float));
    } else {
      std::memcpy(st.centres_in + class_id * st.dim, current + class_id * st.dim,
                  st.dim * sizeof(float));
    }
  }
}

void Runtime::Feed(const float* frame, float* dst) const {
  // host.py _make_feed: a plain copy for identity preprocessing.
  if (identity_) {
    std::memcpy(dst, frame, frame_size_ * sizeof(float));
  } else {
    Preprocess(frame, dst, frame_size_, scale_.data(), offset_.data(), channels_);
  }
}

void Runtime::FeedChecked(const float* frame, size_t size, float* dst) const {
  if (frame == nullptr || size != frame_size_) {
    std::ostringstream shape;
    for (size_t i = 0; i < input_shape_.size(); ++i) shape << (i ? ", " : "") << input_shape_[i];
    Fail(Error::Code::kArgument, "The frame has " + std::to_string(frame ? size : 0) +
                                     " values; the model takes [" + shape.str() + "] (" +
                                     std::to_string(frame_size_) + " float32 pixels).");
  }
  // The frame is read from memory once, by the copy; the check reads the
  // copy, in cache. A non-finite pixel stays non-finite through the affine
  // preprocessing; a finite one that overflows it is the model's to refuse
  // (as in Python, which checks the pixels), so the pixels decide.
  Feed(frame, dst);
  if (!AllFinite(dst, frame_size_)) {
    const size_t bad = CountNonFinite(frame, size);
    if (bad) {
      Fail(Error::Code::kFrame, "The frame has " + std::to_string(bad) +
                                    " non-finite pixels (NaN or infinity); it was not "
                                    "classified.");
    }
  }
}

int Runtime::RunFull(const float* frame) {
  if (frame != nullptr) Feed(frame, full_in_);
  session_->Run(full_);
  if (!std::isfinite(MaxOf(full_out_, num_classes_))) {
    Fail(Error::Code::kFrame, "The full model's probabilities for this frame are not finite; "
                              "it was not classified.");
  }
  return ArgMax(full_out_, num_classes_);
}

FrameResult Runtime::Classify(const float* frame, size_t size) {
  FeedChecked(frame, size, stages_.front().activation_in);
  Memory& memory = *memory_;
  const float* activation = nullptr;
  const size_t n = stages_.size();
  for (size_t s = 0; s < n; ++s) {
    Stage& st = stages_[s];
    if (activation != nullptr && st.activation_in != activation) {  // Not chained.
      std::memcpy(st.activation_in, activation, st.activation_floats * sizeof(float));
    }
    session_->Run(st.signature);
    activation = st.next_activation;
    if (st.never) continue;
    int answer = memory.Decide(static_cast<int>(s), st.similarities, st.semantic);
    if (answer < 0) continue;
    bool confirmed = false;
    if (memory.VerifyDue()) {
      int full = RunFull(frame);
      bool adapted = memory.Adapted(answer);
      memory.Verified(answer, full);
      if (full != answer) {
        if (adapted && !memory.Adapted(answer)) WriteCentres(answer);  // Reverted.
        answer = full;
        confirmed = true;
      }
    }
    memory.Record(answer, confirmed, semantics_.data(), static_cast<int>(s) + 1,
                  confirmed ? static_cast<double>(MaxOf(full_out_, num_classes_)) : 1.0);
    return {answer, static_cast<int>(s)};
  }
  if (head_in_ != activation) std::memcpy(head_in_, activation, head_in_floats_ * sizeof(float));
  session_->Run(head_);
  float confidence = MaxOf(head_out_, num_classes_);
  if (!std::isfinite(confidence)) {
    std::ostringstream top;
    top << confidence;
    Fail(Error::Code::kFrame, "The model's probabilities for this frame are not finite (top " +
                                  top.str() + "); it was not classified.");
  }
  int answer = ArgMax(head_out_, num_classes_);
  bool adapting = memory.Adapting() && memory.Hot(answer);
  memory.Record(answer, true, semantics_.data(), static_cast<int>(n), confidence);
  if (adapting) WriteCentres(answer);
  return {answer, static_cast<int>(n)};
}

int Runtime::ClassifyFull(const float* frame, size_t size) {
  FeedChecked(frame, size, full_in_);
  return RunFull(nullptr);
}

void Runtime::Reset() {
  memory_->Reset();
  WriteCentres();
}

void Runtime::SetExitRule(std::string_view rule_json) {
  RuleChoice choice = RuleChoice::Parse(rule_json);
  auto next = std::make_unique<Memory>(descriptor_, choice.rule, choice.policy);
  // What a saved state is valid for (host.py _fingerprint): the descriptor
  // alone for its own rule and policy, else the descriptor, a newline and the
  // rule and policy's canonical JSON.
  const std::string_view raw = *session_->Metadata(kDescriptorName);
  RuleChoice own{descriptor_.exit_rule,
                 descriptor_.exit_rule.uses_cache() ? descriptor_.cache : std::nullopt};
  const std::string canonical = choice.CanonicalJson();
  const std::string hashed =
      canonical == own.CanonicalJson() ? std::string(raw) : std::string(raw) + "\n" + canonical;
  fingerprint_ = Sha256Hex(hashed.data(), hashed.size());
  UseMemory(std::move(next));
}

void Runtime::SaveState(const std::string& path) const { memory_->Save(path, fingerprint_); }

bool Runtime::LoadState(const std::string& path, std::string* why) {
  try {
    memory_->Load(path, fingerprint_);
  } catch (const Error& e) {
    if (why) *why = e.what();
    Reset();
    return false;
  }
  WriteCentres();
  return true;
}

}  // namespace smtm
