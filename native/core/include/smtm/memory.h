// The adaptive memory of one stream: exact port of smtm_tf/runtime/cache.py
// MemoryState (cache of hot classes, short-term tier, centre adaptation,
// verification) with the exit metric as MemoryState.lookup computes it.
// Same float32/float64 arithmetic as numpy, so identical inputs give
// identical decisions (docs/descriptor_spec.md, "Lookup" and "Memory").
#ifndef SMTM_MEMORY_H_
#define SMTM_MEMORY_H_

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "smtm/descriptor.h"

namespace smtm {

// What a stage's lookup gives (MemoryState.lookup).
struct Lookup {
  int top1 = 0;
  double value = 0.0;  // The metric's float32 score, widened.
  bool favoured = false;  // Cached or matched by the short-term tier.
};

class Memory {
 public:
  // The descriptor's own rule and cache policy.
  explicit Memory(const Descriptor& descriptor);
  // Another rule and policy on the descriptor's centres (SmtmRuntime.set_exit_rule).
  // `policy` nullopt: no cache. Throws Error kArgument when the rule does not
  // fit (stage count, cold thresholds without a policy, metric params).
  Memory(const Descriptor& descriptor, const ExitRule& rule,
         const std::optional<CachePolicy>& policy);

  int num_stages() const { return num_stages_; }
  int num_classes() const { return num_classes_; }
  int embedding_dim() const { return dim_; }

  // The stage's top-1 class, score and whether it is favoured. `sims` holds K
  // float32 similarities, `semantic` D float32 values (read only when the
  // short-term tier holds frames at this stage).
  Lookup LookupStage(int stage, const float* sims, const float* semantic);
  // The class to exit with at `stage`, or -1 to go on.
  int Decide(int stage, const float* sims, const float* semantic);
  // Counts an early exit; true when this one is to be checked by the full model.
  bool VerifyDue();
  // Records the full model's check of an early exit.
  void Verified(int exit_class, int full_class);
  // Records a frame's answer. `semantics[s]` (D floats) is valid for the
  // first `ran` stages; `confidence` is the full model's top probability for
  // confirmed answers (1.0 otherwise).
  void Record(int cls, bool confirmed, const float* const* semantics, int ran,
              double confidence = 1.0);

  // Forgets the stream: empty cache and short-term tier, original centres.
  void Reset();

  bool Never(int stage) const { return never_[stage]; }
  bool Adapting() const { return adapting_; }
  bool Hot(int c) const { return hot_[c] != 0; }
  bool Adapted(int c) const { return adapted_[c] != 0; }
  bool UsesCache() const { return use_cache_; }
  // The K * D centres lookups use now at `stage` (adapted or original).
  const float* Centres(int stage) const { return &centres_[size_t(stage) * num_classes_ * dim_]; }

  int64_t exits() const { return exits_; }
  int64_t checks() const { return checks_; }
  int64_t disagreements() const { return disagreements_; }
  int64_t reverts() const { return reverts_; }
  int64_t exit_run() const { return exit_run_; }
  bool last_hit() const { return last_hit_; }
  int64_t capacity() const { return capacity_; }
  const std::vector<double>& scores() const { return scores_; }
  const std::vector<float>& shift() const { return shift_; }

  // Writes the state as host.py save_state does (numpy .npz: state_* arrays
  // and a `meta` JSON string {"format_version": 3, "model": fingerprint}),
  // atomically (temporary file beside `path`, renamed; removed on failure).
  // Throws Error kIo.
  void Save(const std::string& path, const std::string& fingerprint) const;
  // Restores a state written by Save or by Python's save_state. Throws Error
  // kState saying why (missing, corrupted, other format or fingerprint, out
  // of range) and leaves the memory unchanged; the caller then resets.
  void Load(const std::string& path, const std::string& fingerprint);

  // The .npz file format version (host.py STATE_FORMAT_VERSION).
  static constexpr int kStateFormatVersion = 3;

 private:
  void Init(const Descriptor& descriptor, const ExitRule& rule,
            const std::optional<CachePolicy>& policy);
  void ForgetInstances();
  void RevertCentres();
  void RevertCentres(int c);
  void Refresh();
  void Resize();
  void Remember(int cls, const float* const* semantics, int ran);
  void Adapt(int cls, const float* const* semantics);
  void Renormalise(int c);

  CachePolicy policy_;
  ExitRule rule_;
  int num_stages_ = 0, num_classes_ = 0, dim_ = 0;
  bool use_cache_ = false, shifting_ = false, contrast_ = false, adapting_ = false;
  int64_t slots_ = 0;
  int64_t verify_every_ = 0;
  float instance_shift_f_ = 0.0f, adapt_rate_f_ = 0.0f, max_drift_f_ = 0.0f;
  std::vector<double> hot_t_, cold_t_;
  std::vector<float> inst_t_f_;   // float32 instance thresholds (numpy compares in float32).
  std::vector<bool> inst_on_;     // Stage has a finite instance threshold.
  std::vector<bool> never_;
  std::vector<float> original_, centres_, offsets_;  // S * K * D
  std::vector<float> inst_;        // S * max(slots, 1) * D
  std::vector<int64_t> inst_class_;  // S * max(slots, 1)
  std::vector<int64_t> inst_count_, inst_next_;
  std::vector<double> scores_;
  std::vector<uint8_t> hot_, adapted_;
  std::vector<float> shift_;
  std::vector<int64_t> answers_, left_out_;
  std::vector<float> work_;
  std::vector<float> match_;
  // Refresh's scratch (K entries each), kept so a frame allocates nothing.
  std::vector<size_t> cached_, order_;
  std::vector<double> picked_;
  int64_t capacity_ = 0, frame_in_window_ = 0;
  bool last_hit_ = false;
  int64_t exits_ = 0, exit_run_ = 0, checks_ = 0, disagreements_ = 0, reverts_ = 0;
};

}  // namespace smtm

#endif  // SMTM_MEMORY_H_
