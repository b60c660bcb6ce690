// Exact port of smtm_tf/runtime/cache.py MemoryState (numpy 2 arithmetic:
// float32 rows, float64 scores, Python floats meeting float32 arrays are
// rounded to float32 first, as NEP 50 does).
#include "smtm/memory.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <set>

#include "numeric.h"
#include "smtm/error.h"

namespace smtm {
namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();

// numpy's maximum / minimum on float32: a NaN in either propagates.
float NpMax(float a, float b) {
  if (std::isnan(a)) return a;
  if (std::isnan(b)) return b;
  return a >= b ? a : b;
}
float NpMin(float a, float b) {
  if (std::isnan(a)) return a;
  if (std::isnan(b)) return b;
  return a <= b ? a : b;
}

// sqrt(sum(x * x)) over n contiguous float32 values, as numpy computes
// `np.sqrt((x * x).sum(axis=-1))`.
float Norm(const float* x, size_t n, std::vector<float>* tmp) {
  tmp->resize(n);
  for (size_t i = 0; i < n; ++i) (*tmp)[i] = x[i] * x[i];
  return std::sqrt(internal::PairwiseSum(tmp->data(), n));
}

}  // namespace

Memory::Memory(const Descriptor& descriptor) {
  Init(descriptor, descriptor.exit_rule, descriptor.cache);
}

Memory::Memory(const Descriptor& descriptor, const ExitRule& rule,
               const std::optional<CachePolicy>& policy) {
  Init(descriptor, rule, policy);
}

void Memory::Init(const Descriptor& descriptor, const ExitRule& rule,
                  const std::optional<CachePolicy>& given) {
  // SmtmRuntime.set_exit_rule.
  if (rule.num_stages() != descriptor.num_stages()) {
    throw Error(Error::Code::kArgument,
                "The rule has " + std::to_string(rule.num_stages()) + " stages, the model " +
                    std::to_string(descriptor.num_stages()) + ".");
  }
  if (rule.uses_cache() && !given) {
    throw Error(Error::Code::kArgument, "A rule with cold thresholds needs a cache policy.");
  }
  rule.Validate();
  if (rule.metric_params) {  // Validate checked one finite [C, 2] array per stage.
    for (size_t s = 0; s < rule.metric_params->size(); ++s) {
      const size_t classes = (*rule.metric_params)[s].size() / 2;
      if (classes != size_t(descriptor.num_classes())) {
        throw Error(Error::Code::kArgument,
                    "metric_params[" + std::to_string(s) + "] covers " + std::to_string(classes) +
                        " classes, the model " + std::to_string(descriptor.num_classes()) + ".");
      }
    }
  }
  // The policy is kept only for a rule with cold thresholds (set_exit_rule).
  const std::optional<CachePolicy> policy = rule.uses_cache() ? given : std::nullopt;
  if (policy) policy->Validate();
  // MemoryState.__init__.
  std::set<int> dims;
  for (const auto& st : descriptor.stages) dims.insert(st.embedding_dim);
  if (dims.size() != 1) {
    std::string got;
    for (int d : dims) got += (got.empty() ? "" : ", ") + std::to_string(d);
    throw Error(Error::Code::kModelFile,
                "All stages need the same embedding size, got [" + got + "].");
  }
  policy_ = policy ? *policy : CachePolicy::NoCache();
  rule_ = rule;
  num_stages_ = descriptor.num_stages();
  num_classes_ = descriptor.num_classes();
  dim_ = *dims.begin();
  const size_t S = size_t(num_stages_), K = size_t(num_classes_), D = size_t(dim_);
  for (const auto& st : descriptor.stages) {
    if (size_t(st.num_classes) != K || st.centres.size() != K * D) {
      throw Error(Error::Code::kModelFile, "A stage's centres do not cover the descriptor's classes.");
    }
  }
  if (rule_.metric == Metric::kLayerAware) {
    for (const auto& p : *rule_.metric_params) {
      if (p.size() != 2 * K) {
        throw Error(Error::Code::kArgument, "The rule's metric_params do not cover " +
                                                std::to_string(K) + " classes.");
      }
    }
  }
  use_cache_ = policy && policy_.max_hot > 0 && rule_.uses_cache();
  hot_t_.assign(S, kInf);
  cold_t_.assign(S, kInf);
  inst_t_f_.assign(S, std::numeric_limits<float>::infinity());
  inst_on_.assign(S, false);
  never_.assign(S, false);
  bool any_inst = false;
  for (size_t s = 0; s < S; ++s) {
    auto h = rule_.ThresholdFor(int(s), true), c = rule_.ThresholdFor(int(s), false);
    hot_t_[s] = h ? *h : kInf;
    cold_t_[s] = c ? *c : kInf;
    std::optional<double> i;
    if (rule_.instance_thresholds) i = (*rule_.instance_thresholds)[s];
    if (i) {
      inst_on_[s] = true;
      any_inst = true;
      inst_t_f_[s] = static_cast<float>(*i);
    }
    never_[s] = !h && !c && !i;
  }
  slots_ = policy && any_inst ? policy_.instance_slots : 0;
  adapting_ = policy && policy_.adapt_rate > 0;
  // round(1.0 / verify_rate): Python rounds half to even.
  verify_every_ = 0;
  if (policy_.verify_rate > 0) {
    double every = std::nearbyint(1.0 / policy_.verify_rate);
    verify_every_ = every > 4e18 ? int64_t(4e18) : int64_t(every);
  }
  instance_shift_f_ = static_cast<float>(policy_.instance_shift);
  adapt_rate_f_ = static_cast<float>(policy_.adapt_rate);
  max_drift_f_ = static_cast<float>(policy_.max_drift);
  original_.resize(S * K * D);
  for (size_t s = 0; s < S; ++s) {
    std::copy(descriptor.stages[s].centres.begin(), descriptor.stages[s].centres.end(),
              original_.begin() + s * K * D);
  }
  centres_ = original_;
  offsets_.assign(S * K * D, 0.0f);
  const size_t m = size_t(std::max<int64_t>(slots_, 1));
  inst_.assign(S * m * D, 0.0f);
  inst_class_.assign(S * m, -1);
  scores_.assign(K, 0.0);
  hot_.assign(K, 0);
  adapted_.assign(K, 0);
  shift_.assign(K, 0.0f);
  shifting_ = use_cache_ && policy_.prior_weight > 0;
  contrast_ = policy_.prior == Prior::kContrast;
  answers_.assign(K, 0);
  left_out_.assign(K, 0);
  work_.assign(K, 0.0f);
  match_.assign(m, 0.0f);
  cached_.reserve(K);
  order_.reserve(K);
  picked_.reserve(K);
  Reset();
}

void Memory::Reset() {
  std::fill(scores_.begin(), scores_.end(), 0.0);
  std::fill(hot_.begin(), hot_.end(), 0);
  std::fill(shift_.begin(), shift_.end(), 0.0f);
  std::fill(answers_.begin(), answers_.end(), 0);
  capacity_ = policy_.min_hot;
  frame_in_window_ = 0;
  std::fill(left_out_.begin(), left_out_.end(), 0);
  ForgetInstances();
  last_hit_ = false;
  exits_ = exit_run_ = checks_ = disagreements_ = reverts_ = 0;
  RevertCentres();
}

void Memory::ForgetInstances() {
  inst_count_.assign(size_t(num_stages_), 0);
  inst_next_.assign(size_t(num_stages_), 0);
  std::fill(inst_class_.begin(), inst_class_.end(), -1);
}

void Memory::RevertCentres() {
  centres_ = original_;
  std::fill(offsets_.begin(), offsets_.end(), 0.0f);
  std::fill(adapted_.begin(), adapted_.end(), 0);
}

void Memory::RevertCentres(int c) {
  const size_t K = size_t(num_classes_), D = size_t(dim_);
  for (size_t s = 0; s < size_t(num_stages_); ++s) {
    size_t at = (s * K + size_t(c)) * D;
    std::copy(original_.begin() + at, original_.begin() + at + D, centres_.begin() + at);
    std::fill(offsets_.begin() + at, offsets_.begin() + at + D, 0.0f);
  }
  adapted_[size_t(c)] = 0;
}

Lookup Memory::LookupStage(int stage, const float* sims, const float* semantic) {
  if (stage < 0 || stage >= num_stages_) {
    throw Error(Error::Code::kArgument, "stage " + std::to_string(stage) + " is out of range.");
  }
  const size_t K = size_t(num_classes_), D = size_t(dim_);
  float* work = work_.data();
  if (shifting_) {
    for (size_t c = 0; c < K; ++c) work[c] = sims[c] + shift_[c];
  } else {
    std::copy(sims, sims + K, work);
  }
  int64_t matched = -1;
  const int64_t count = inst_count_[size_t(stage)];
  if (count && inst_on_[size_t(stage)]) {
    // inst[stage, :count] @ semantic. numpy hands this to BLAS (sgemv); here
    // each dot product is summed in float64 and rounded once to float32
    // (docs/descriptor_spec.md: the one place the last bit may differ).
    const size_t m = size_t(std::max<int64_t>(slots_, 1));
    const float* rows = &inst_[size_t(stage) * m * D];
    for (int64_t j = 0; j < count; ++j) {
      double acc = 0.0;
      for (size_t i = 0; i < D; ++i) acc += double(rows[size_t(j) * D + i]) * double(semantic[i]);
      match_[size_t(j)] = static_cast<float>(acc);
    }
    size_t j = internal::ArgMax(match_.data(), size_t(count));
    if (match_[j] >= inst_t_f_[size_t(stage)]) {
      matched = inst_class_[size_t(stage) * m + j];
      work[matched] = work[matched] + instance_shift_f_;
    }
  }
  // The metric for one frame, in float32 (exit_policy.score).
  const size_t top1 = internal::ArgMax(work, K);
  const float best = work[top1];
  float value = best;
  if (rule_.metric != Metric::kTop1) {
    work[top1] = -std::numeric_limits<float>::infinity();
    value = best - work[internal::ArgMax(work, K)];
    if (rule_.metric == Metric::kLayerAware) {
      const std::vector<float>& p = (*rule_.metric_params)[size_t(stage)];
      const float a = p[2 * top1], b = p[2 * top1 + 1];
      const float product = b * value;  // Built with -ffp-contract=off: no fused multiply-add.
      value = a + product;
    }
  }
  Lookup out;
  out.top1 = int(top1);
  out.value = double(value);
  out.favoured = hot_[top1] != 0 || int64_t(top1) == matched;
  return out;
}

int Memory::Decide(int stage, const float* sims, const float* semantic) {
  Lookup l = LookupStage(stage, sims, semantic);
  double threshold = l.favoured ? hot_t_[size_t(stage)] : cold_t_[size_t(stage)];
  return l.value >= threshold ? l.top1 : -1;
}

bool Memory::VerifyDue() {
  ++exits_;
  ++exit_run_;
  const int64_t after = policy_.verify_after;
  return (after && exit_run_ > after) || (verify_every_ > 0 && exits_ % verify_every_ == 0);
}

void Memory::Verified(int exit_class, int full_class) {
  if (exit_class < 0 || exit_class >= num_classes_) {
    throw Error(Error::Code::kArgument,
                "exit class " + std::to_string(exit_class) + " is out of range.");
  }
  ++checks_;
  exit_run_ = 0;  // The full model has answered: a new run starts.
  if (exit_class != full_class) {
    ++disagreements_;
    ForgetInstances();
    // The exit class leaves the cache: a wrong class that stays cached would
    // keep attracting wrong exits.
    scores_[size_t(exit_class)] = 0.0;
    Refresh();
    if (adapted_[size_t(exit_class)]) {
      RevertCentres(exit_class);
      ++reverts_;
    }
  }
}

void Memory::Record(int cls, bool confirmed, const float* const* semantics, int ran,
                    double confidence) {
  if (cls < 0 || cls >= num_classes_) {
    throw Error(Error::Code::kArgument, "class " + std::to_string(cls) + " is out of range.");
  }
  if (ran < 0 || ran > num_stages_) {
    throw Error(Error::Code::kArgument, "ran " + std::to_string(ran) + " is out of range.");
  }
  if (ran > 0 && semantics == nullptr && (slots_ || adapting_)) {
    throw Error(Error::Code::kArgument, "Record needs the semantic vectors of the stages that ran.");
  }
  const CachePolicy& p = policy_;
  if (slots_ && ran && confirmed && confidence >= p.instance_min_confidence) {
    Remember(cls, semantics, ran);
  }
  if (confirmed) exit_run_ = 0;
  if (!use_cache_) return;
  const size_t c = size_t(cls);
  last_hit_ = hot_[c] != 0;
  if (!last_hit_ && scores_[c] >= p.hot_min) ++left_out_[c];  // Qualified, but the cache was full.
  ++answers_[c];
  for (double& s : scores_) s *= p.decay;
  if (!confirmed) {
    scores_[c] += p.exit_weight;
  } else if (confidence >= p.admit_min_confidence) {
    scores_[c] += 1.0;
  }
  if (adapting_ && confirmed && ran == num_stages_ && hot_[c]) Adapt(cls, semantics);
  if (++frame_in_window_ >= p.window) Resize();
  Refresh();
}

void Memory::Refresh() {
  const CachePolicy& p = policy_;
  const size_t K = size_t(num_classes_);
  std::vector<size_t>& cached = cached_;
  cached.clear();
  for (size_t c = 0; c < K; ++c) {
    hot_[c] = scores_[c] >= p.hot_min;
    if (hot_[c]) cached.push_back(c);
  }
  if (int64_t(cached.size()) > capacity_) {
    // np.argsort(-scores, kind="stable")[:capacity], then sorted.
    std::vector<size_t>& order = order_;
    order.resize(K);
    std::iota(order.begin(), order.end(), size_t(0));
    // The stable order by falling score is the total order (score down, index
    // up): its first `capacity` entries, without stable_sort's buffer.
    std::partial_sort(order.begin(), order.begin() + capacity_, order.end(),
                      [&](size_t a, size_t b) {
                        return scores_[a] > scores_[b] || (scores_[a] == scores_[b] && a < b);
                      });
    order.resize(size_t(capacity_));
    std::fill(hot_.begin(), hot_.end(), 0);
    for (size_t c : order) hot_[c] = 1;
    std::sort(order.begin(), order.end());
    cached.assign(order.begin(), order.end());
  }
  if (!shifting_) return;
  // Log-odds of recent answers, each score smoothed by 1/K.
  const double k = double(K);
  double base;
  if (contrast_) {
    const size_t outside = K - cached.size();
    double rest = 0.0;
    if (outside) {
      std::vector<double>& picked = picked_;
      picked.clear();
      for (size_t c : cached) picked.push_back(scores_[c]);
      rest = internal::PairwiseSum(scores_.data(), K) -
             internal::PairwiseSum(picked.data(), picked.size());
    }
    base = rest / double(std::max<size_t>(outside, 1)) + 1.0 / k;
  } else {
    base = (internal::PairwiseSum(scores_.data(), K) + 1.0) / k;
  }
  std::fill(shift_.begin(), shift_.end(), 0.0f);
  for (size_t c : cached) {
    double evidence = std::log((scores_[c] + 1.0 / k) / base);
    if (evidence > 0.0) shift_[c] = static_cast<float>(p.prior_weight * evidence);
  }
}

void Memory::Resize() {
  const CachePolicy& p = policy_;
  int64_t total = 0, nonzero = 0;
  bool idle_hot = false;
  for (size_t c = 0; c < size_t(num_classes_); ++c) {
    total += left_out_[c];
    nonzero += left_out_[c] != 0;
    idle_hot = idle_hot || (hot_[c] && answers_[c] == 0);
  }
  if (total >= p.grow_after) {
    capacity_ = std::min(p.max_hot, capacity_ + nonzero);
  } else if (idle_hot) {
    capacity_ = std::max(p.min_hot, capacity_ - 1);
  }
  frame_in_window_ = 0;
  std::fill(left_out_.begin(), left_out_.end(), 0);
  std::fill(answers_.begin(), answers_.end(), 0);
}

void Memory::Remember(int cls, const float* const* semantics, int ran) {
  const size_t D = size_t(dim_), m = size_t(std::max<int64_t>(slots_, 1));
  for (size_t s = 0; s < size_t(ran); ++s) {
    const int64_t k = inst_next_[s];
    std::copy(semantics[s], semantics[s] + D, &inst_[(s * m + size_t(k)) * D]);
    inst_class_[s * m + size_t(k)] = cls;
    inst_next_[s] = (k + 1) % slots_;
    if (inst_count_[s] < slots_) ++inst_count_[s];
  }
}

void Memory::Adapt(int cls, const float* const* semantics) {
  const size_t K = size_t(num_classes_), D = size_t(dim_);
  std::vector<float> tmp;
  for (size_t s = 0; s < size_t(num_stages_); ++s) {
    const size_t at = (s * K + size_t(cls)) * D;
    float* offset = &offsets_[at];
    const float* orig = &original_[at];
    const float* sem = semantics[s];
    // offset += adapt_rate * (semantics - original - offset), each step in float32.
    for (size_t i = 0; i < D; ++i) {
      float diff = sem[i] - orig[i];
      diff = diff - offset[i];
      float step = adapt_rate_f_ * diff;
      offset[i] = offset[i] + step;
    }
    // offset *= minimum(1, max_drift / maximum(norm, 1e-12)).
    float norm = Norm(offset, D, &tmp);
    float factor = NpMin(1.0f, max_drift_f_ / NpMax(norm, 1e-12f));
    for (size_t i = 0; i < D; ++i) offset[i] = offset[i] * factor;
  }
  Renormalise(cls);
}

void Memory::Renormalise(int cls) {
  // centres[:, c] = (original + offset) / |original + offset|, in float32.
  const size_t K = size_t(num_classes_), D = size_t(dim_);
  std::vector<float> moved(D), tmp;
  for (size_t s = 0; s < size_t(num_stages_); ++s) {
    const size_t at = (s * K + size_t(cls)) * D;
    for (size_t i = 0; i < D; ++i) moved[i] = original_[at + i] + offsets_[at + i];
    float norm = Norm(moved.data(), D, &tmp);
    for (size_t i = 0; i < D; ++i) centres_[at + i] = moved[i] / norm;
  }
  adapted_[size_t(cls)] = 1;
}

}  // namespace smtm
