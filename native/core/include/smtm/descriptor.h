// The SMTM descriptor: versioned JSON embedded in the .tflite's metadata
// (port of smtm_tf/runtime/descriptor.py; the contract is docs/descriptor_spec.md).
#ifndef SMTM_DESCRIPTOR_H_
#define SMTM_DESCRIPTOR_H_

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "smtm/preprocessing.h"

namespace smtm {

inline constexpr int kSchemaVersion = 2;
inline constexpr size_t kMaxDescriptorBytes = size_t{64} << 20;
inline constexpr int kMaxJsonDepth = 16;
inline constexpr int64_t kMaxDim = int64_t{1} << 20;
inline constexpr int kMaxClasses = 100000;
inline constexpr int kMaxStages = 64;
inline constexpr double kCentreNormTolerance = 1e-3;
// Bound on a policy's sizes and a restored state's counters.
inline constexpr int64_t kMaxCount = int64_t{1} << 40;

struct TensorSpec {
  std::string name;
  std::vector<int64_t> shape;  // -1: any size (lookup operator only).
  std::string dtype = "float32";  // "float32", "int32" or "bool".
  bool operator==(const TensorSpec& o) const {
    return name == o.name && shape == o.shape && dtype == o.dtype;
  }
};

// A signature of the .tflite: its key and named inputs and outputs.
struct SignatureSpec {
  std::string key;
  std::vector<TensorSpec> inputs;
  std::vector<TensorSpec> outputs;
  // The input / output of that name, or nullptr.
  const TensorSpec* Input(std::string_view name) const;
  const TensorSpec* Output(std::string_view name) const;
};

// One stage: signature (inputs activation, centres [K, D]; outputs
// next_activation, semantic [D], similarities [K]), cost and centres.
struct StageSpec {
  SignatureSpec signature;
  std::string cut_layer;
  double cost = 0.0;
  int num_classes = 0;     // K
  int embedding_dim = 0;   // D
  std::vector<float> centres;  // K * D, row-major, unit-norm or zero rows.
};

enum class Metric { kTop1, kMargin, kLayerAware };
// "top1", "margin", "layer_aware".
const char* MetricName(Metric m);

// Per-stage thresholds: nullopt means the stage never exits.
using Thresholds = std::vector<std::optional<double>>;

// As exit_policy.py ExitRule.
struct ExitRule {
  Metric metric = Metric::kMargin;
  Thresholds thresholds;
  double target_agreement = 1.0;
  std::optional<Thresholds> cold_thresholds;      // With a cache.
  std::optional<Thresholds> instance_thresholds;  // With a short-term tier.
  // LAYER_AWARE only: per stage, C * 2 float32 (intercept, slope) per class.
  std::optional<std::vector<std::vector<float>>> metric_params;

  int num_stages() const { return static_cast<int>(thresholds.size()); }
  bool uses_cache() const { return cold_thresholds.has_value(); }
  std::optional<double> ThresholdFor(int stage, bool hot) const;
  // Checks ranges as ExitRule.__post_init__ (throws Error kModelFile / kArgument).
  void Validate() const;
};

enum class Prior { kShare, kContrast };

// As cache.py CachePolicy (defaults are the Python defaults).
struct CachePolicy {
  double decay = 0.9;
  double exit_weight = 0.25;
  double admit_min_confidence = 0.9;
  double hot_min = 0.3;
  int64_t min_hot = 1;
  int64_t max_hot = 6;
  int64_t window = 10;
  int64_t grow_after = 2;
  double prior_weight = 1.0 / 8.0;
  Prior prior = Prior::kShare;
  int64_t instance_slots = 0;
  double instance_match = 0.95;
  double instance_shift = 0.1;
  double instance_min_confidence = 0.9;
  double adapt_rate = 0.0;
  double max_drift = 0.3;
  double verify_rate = 0.0;
  int64_t verify_after = 64;

  // The policy MemoryState uses without a cache: max_hot = min_hot = 0,
  // instance_slots = 0, verify_after = 0.
  static CachePolicy NoCache();
  // Range checks of CachePolicy.__post_init__ (throws Error kModelFile).
  void Validate() const;
};

struct LookupOpSpec {
  std::string name = "SMTM_CACHE_LOOKUP";
  int version = 1;
  std::string compare_with = "all_classes";
};

// All that SMTM adds to a .tflite, as stored in its metadata.
struct Descriptor {
  int schema_version = kSchemaVersion;
  std::string model_name;
  std::vector<std::string> class_names;
  std::string pooling;
  std::vector<StageSpec> stages;
  SignatureSpec head;
  SignatureSpec full;
  ExitRule exit_rule;
  LookupOpSpec lookup_op;
  std::string quantization = "float32";
  std::optional<CachePolicy> cache;
  Preprocessing preprocessing;

  int num_classes() const { return static_cast<int>(class_names.size()); }
  int num_stages() const { return static_cast<int>(stages.size()); }
  int embedding_dim() const { return stages.empty() ? 0 : stages[0].embedding_dim; }

  // Parses and validates a descriptor exactly as Descriptor.from_json does
  // (schema versions 1 and 2). Throws Error kModelFile whose message names
  // the bad field, e.g. "stages[1].centres: row 3 is not unit-norm (norm 1e+30)".
  static Descriptor Parse(std::string_view json);
};

// Another exit rule and cache policy for a loaded model, as JSON in the
// descriptor's own schema: {"exit_rule": {...}, "cache": {...} or null}
// (what Descriptor.to_dict writes for those two fields). `policy` is nullopt
// without a cache, and for a rule without cold thresholds (as host.py
// set_exit_rule drops it). Parsed and range-checked as in a descriptor;
// Memory checks it against the model. Throws Error kArgument naming the field.
struct RuleChoice {
  ExitRule rule;
  std::optional<CachePolicy> policy;

  static RuleChoice Parse(std::string_view json);
  // What host.py _fingerprint hashes for a rule other than the descriptor's:
  // json.dumps([rule.to_dict(), policy.to_dict() or None], sort_keys=True,
  // separators=(",", ":")), floats as Python's repr writes them (metric
  // params through float32's shortest form, as to_dict does).
  std::string CanonicalJson() const;
};

}  // namespace smtm

#endif  // SMTM_DESCRIPTOR_H_
