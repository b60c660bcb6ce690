// Port of smtm_tf/runtime/descriptor.py Descriptor.from_json, with every check.
#include "smtm/descriptor.h"

#include <algorithm>
#include <cerrno>
#include <charconv>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <map>
#include <set>
#include <utility>

#include <nlohmann/json.hpp>

#include "numeric.h"
#include "smtm/error.h"

namespace smtm {
namespace {

using Json = nlohmann::ordered_json;

// A descriptor error: the field's path and what is wrong (DescriptorError).
struct DescError {
  std::string field;
  std::string reason;
};

[[noreturn]] void Fail(const std::string& reason, const std::string& field = "") {
  throw DescError{field, reason};
}

// Runs f, prefixing the path of a DescError raised inside with `field` (descriptor.py _at).
template <typename F>
auto At(const std::string& field, F&& f) -> decltype(f()) {
  try {
    return f();
  } catch (DescError& e) {
    const std::string& inner = e.field;
    std::string path = field;
    if (!inner.empty()) path += (inner[0] == '[' ? inner : "." + inner);
    throw DescError{path, e.reason};
  }
}

// Python's repr() of a JSON value, near enough for messages.
std::string Repr(const Json& v) {
  if (v.is_null()) return "None";
  if (v.is_boolean()) return v.get<bool>() ? "True" : "False";
  if (v.is_string()) return "'" + v.get<std::string>() + "'";
  std::string s = v.dump();
  return s.size() > 80 ? s.substr(0, 77) + "..." : s;
}

std::string Num(double v) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.17g", v);
  // Shortest that reads back (as Python's repr).
  for (int p = 1; p <= 17; ++p) {
    char b[64];
    std::snprintf(b, sizeof b, "%.*g", p, v);
    if (std::strtod(b, nullptr) == v) return b;
  }
  return buf;
}

std::string Listing(const std::vector<std::string>& names) {
  std::string s = "[";
  for (size_t i = 0; i < names.size(); ++i) s += (i ? ", '" : "'") + names[i] + "'";
  return s + "]";
}

bool IsNumber(const Json& v) { return v.is_number() && !v.is_boolean(); }

// A JSON number as a double (Python's float(value)); non-numbers fail.
double AsDouble(const Json& v) {
  if (v.is_number_integer()) {
    return v.is_number_unsigned() ? static_cast<double>(v.get<uint64_t>())
                                  : static_cast<double>(v.get<int64_t>());
  }
  return v.get<double>();
}

// descriptor.py _whole: an int in [low, high] (JSON may spell it 3.0).
int64_t Whole(const Json& v, const std::string& what, int64_t low = 0, int64_t high = kMaxDim) {
  if (!IsNumber(v)) Fail(what + " must be a whole number, got " + Repr(v) + ".");
  double d = AsDouble(v);
  if (v.is_number_float() && !(std::isfinite(d) && d == std::floor(d))) {
    Fail(what + " must be a whole number, got " + Repr(v) + ".");
  }
  if (!(d >= static_cast<double>(low) && d <= static_cast<double>(high))) {
    Fail(what + " must be in [" + std::to_string(low) + ", " + std::to_string(high) +
         "], got " + Repr(v) + ".");
  }
  if (v.is_number_integer() && !v.is_number_unsigned()) return v.get<int64_t>();
  return static_cast<int64_t>(d);
}

// descriptor.py _finite.
double Finite(const Json& v, const std::string& what) {
  if (!IsNumber(v)) Fail(what + " must be a number, got " + Repr(v) + ".");
  double d = AsDouble(v);
  if (!std::isfinite(d)) Fail(what + " must be finite, got " + Repr(v) + ".");
  return d;
}

std::string Text(const Json& v, const std::string& what) {
  if (!v.is_string() || v.get<std::string>().empty()) {
    Fail(what + " must be a non-empty string, got " + Repr(v) + ".");
  }
  return v.get<std::string>();
}

// descriptor.py _check_fields: unknown and missing fields of a dataclass.
void CheckFields(const char* cls, const Json& d, const std::set<std::string>& required,
                 const std::set<std::string>& optional) {
  if (!d.is_object()) {
    Fail(std::string(cls) + " must be a JSON object, got " +
         (d.is_array() ? "list" : d.is_string() ? "str" : d.is_null() ? "NoneType"
          : d.is_boolean() ? "bool" : d.is_number_float() ? "float" : "int") + ".");
  }
  std::vector<std::string> unknown, missing;
  for (auto it = d.begin(); it != d.end(); ++it) {
    if (!required.count(it.key()) && !optional.count(it.key())) unknown.push_back(it.key());
  }
  for (const auto& r : required) {
    if (!d.contains(r)) missing.push_back(r);
  }
  if (!unknown.empty() || !missing.empty()) {
    std::sort(unknown.begin(), unknown.end());
    Fail(std::string(cls) + ": unknown fields " + Listing(unknown) + ", missing fields " +
         Listing(missing) + ".");
  }
}

// Python's KeyError for a field the dataclass defaults but from_dict reads.
const Json& Key(const Json& d, const std::string& key) {
  auto it = d.find(key);
  if (it == d.end()) Fail("KeyError: '" + key + "'");
  return *it;
}

// Python float(x) on a str / bool / number (ExitRule.from_dict's target_agreement).
double PyFloat(const Json& v, const std::string& what) {
  if (v.is_boolean()) return v.get<bool>() ? 1.0 : 0.0;
  if (IsNumber(v)) return AsDouble(v);
  if (v.is_string()) {
    std::string s = v.get<std::string>();
    size_t a = s.find_first_not_of(" \t\n\r\f\v");
    size_t b = s.find_last_not_of(" \t\n\r\f\v");
    if (a != std::string::npos) {
      std::string t = s.substr(a, b - a + 1);
      errno = 0;
      char* end = nullptr;
      double d = std::strtod(t.c_str(), &end);
      if (end == t.c_str() + t.size() && t.find_first_of("xX") == std::string::npos) return d;
    }
    Fail("could not convert string to float: " + Repr(v));
  }
  (void)what;
  Fail(std::string("TypeError: float() argument must be a string or a real number, not '") +
       (v.is_null() ? "NoneType" : v.is_array() ? "list" : "dict") + "'");
}

TensorSpec ParseTensor(const Json& d) {
  CheckFields("TensorSpec", d, {"name", "shape"}, {"dtype"});
  TensorSpec t;
  const Json& name = d["name"];
  if (!name.is_string() || name.get<std::string>().empty()) Fail("A tensor needs a name.");
  t.name = name.get<std::string>();
  const Json& shape = d["shape"];
  if (!shape.is_array() || shape.size() > 8) {
    Fail("shape must be a list of at most 8 sizes, got " + Repr(shape) + ".");
  }
  for (size_t i = 0; i < shape.size(); ++i) {
    t.shape.push_back(Whole(shape[i], "shape[" + std::to_string(i) + "]", -1));
  }
  if (d.contains("dtype")) {
    const Json& dt = d["dtype"];
    std::string s = dt.is_string() ? dt.get<std::string>() : "";
    if (s != "float32" && s != "int32" && s != "bool") {
      Fail("dtype must be one of ['float32', 'int32', 'bool'], got " + Repr(dt) + ".");
    }
    t.dtype = s;
  }
  return t;
}

std::vector<TensorSpec> ParseTensors(const Json& d, const std::string& kind) {
  const Json& list = Key(d, kind);
  if (!list.is_array() || list.size() > 16) {
    Fail(kind + " must be a list of at most 16 tensors.");
  }
  std::vector<TensorSpec> out;
  for (size_t i = 0; i < list.size(); ++i) {
    out.push_back(At(kind + "[" + std::to_string(i) + "]", [&] { return ParseTensor(list[i]); }));
  }
  return out;
}

SignatureSpec ParseSignature(const Json& d) {
  CheckFields("SignatureSpec", d, {"key", "inputs", "outputs"}, {});
  SignatureSpec s;
  s.inputs = ParseTensors(d, "inputs");
  s.outputs = ParseTensors(d, "outputs");
  s.key = Text(d["key"], "key");
  return s;
}

std::string Quoted(const std::string& s) { return "'" + s + "'"; }

std::string ShapeText(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

// SignatureSpec.check_names: exactly these tensors, once each.
void CheckNames(const SignatureSpec& sig, std::vector<std::string> inputs,
                std::vector<std::string> outputs) {
  for (int k = 0; k < 2; ++k) {
    const auto& tensors = k == 0 ? sig.inputs : sig.outputs;
    auto& want = k == 0 ? inputs : outputs;
    std::vector<std::string> names;
    for (const auto& t : tensors) names.push_back(t.name);
    std::vector<std::string> sorted = names;
    std::sort(sorted.begin(), sorted.end());
    std::sort(want.begin(), want.end());
    if (sorted != want) {
      Fail("signature " + Quoted(sig.key) + " must have the tensors " + Listing(want) +
               ", the descriptor lists " + Listing(names) + ".",
           k == 0 ? "inputs" : "outputs");
    }
  }
}

// float32 value of a JSON number (numpy's asarray(..., float32)); bools are 0/1.
float AsFloat32(const Json& v) {
  if (v.is_boolean()) return v.get<bool>() ? 1.0f : 0.0f;
  if (!IsNumber(v)) Fail("could not convert " + Repr(v) + " to float32");
  return static_cast<float>(AsDouble(v));
}

// A [rows, cols] float32 matrix from nested lists (np.asarray(x, np.float32)).
// Returns its ndim (1 or 2) in *ndim; a list of numbers is a 1-d array.
std::vector<float> Matrix(const Json& v, int* ndim, size_t* rows, size_t* cols) {
  if (!v.is_array()) Fail("must be a list of rows.");
  std::vector<float> out;
  *rows = v.size();
  *cols = 0;
  bool nested = !v.empty() && v[0].is_array();
  for (size_t r = 0; r < v.size(); ++r) {
    if (v[r].is_array() != nested) {
      Fail("setting an array element with a sequence. The requested array has an "
           "inhomogeneous shape after 1 dimensions.");
    }
    if (!nested) {
      out.push_back(AsFloat32(v[r]));
      continue;
    }
    if (r == 0) *cols = v[r].size();
    if (v[r].size() != *cols) {
      Fail("setting an array element with a sequence. The requested array has an "
           "inhomogeneous shape after 1 dimensions. The detected shape was (" +
           std::to_string(v.size()) + ",) + inhomogeneous part.");
    }
    for (const auto& x : v[r]) {
      if (x.is_array()) Fail("must be a [rows, columns] array, got more dimensions");
      out.push_back(AsFloat32(x));
    }
  }
  *ndim = v.empty() || !nested ? 1 : 2;
  return out;
}

StageSpec ParseStage(const Json& d) {
  CheckFields("StageSpec", d, {"signature", "cut_layer", "cost", "centres"}, {});
  StageSpec st;
  st.signature = At("signature", [&] { return ParseSignature(d["signature"]); });
  At("cost", [&] { return Finite(d["cost"], "cost"); });
  int ndim = 0;
  size_t k = 0, dim = 0;
  st.centres = At("centres", [&] { return Matrix(d["centres"], &ndim, &k, &dim); });
  if (ndim != 2) {
    Fail("Stage centres must be [C, D], got shape (" + std::to_string(k) +
         (ndim == 1 ? ",)" : ")") + ".");
  }
  for (size_t r = 0; r < k; ++r) {
    for (size_t j = 0; j < dim; ++j) {
      if (!std::isfinite(st.centres[r * dim + j])) {
        Fail("row " + std::to_string(r) + " holds non-finite values.", "centres");
      }
    }
  }
  std::vector<double> sq(dim);
  for (size_t r = 0; r < k; ++r) {
    for (size_t j = 0; j < dim; ++j) {
      double v = st.centres[r * dim + j];
      sq[j] = v * v;
    }
    double norm = std::sqrt(internal::PairwiseSum(sq.data(), dim));
    if (std::fabs(norm - 1.0) > kCentreNormTolerance && norm != 0.0) {
      char buf[64];
      std::snprintf(buf, sizeof buf, "%.6g", norm);
      Fail("row " + std::to_string(r) + " is not unit-norm (norm " + buf + ").", "centres");
    }
  }
  st.cost = Finite(d["cost"], "cost");
  if (st.cost < 0) Fail("cost must be >= 0, got " + Num(st.cost) + ".");
  st.cut_layer = Text(d["cut_layer"], "cut_layer");
  st.num_classes = static_cast<int>(k);
  st.embedding_dim = static_cast<int>(dim);
  At("signature", [&] {
    CheckNames(st.signature, {"activation", "centres"},
               {"next_activation", "semantic", "similarities"});
    const std::pair<const char*, std::vector<int64_t>> want[] = {
        {"centres", {int64_t(k), int64_t(dim)}},
        {"semantic", {int64_t(dim)}},
        {"similarities", {int64_t(k)}}};
    for (int i = 0; i < 3; ++i) {
      const TensorSpec* t =
          i == 0 ? st.signature.Input(want[i].first) : st.signature.Output(want[i].first);
      if (t->shape != want[i].second) {
        Fail(Quoted(want[i].first) + " has shape " + ShapeText(t->shape) +
                 "; the stage's centres [" + std::to_string(k) + ", " + std::to_string(dim) +
                 "] need " + ShapeText(want[i].second) + ".",
             i == 0 ? "inputs" : "outputs");
      }
    }
    return 0;
  });
  return st;
}

// exit_policy.py _check_thresholds.
Thresholds ParseThresholds(const std::string& name, const Json& v) {
  if (!v.is_array()) Fail(name + " must be a list of finite numbers or None, got " + Repr(v) + ".");
  Thresholds out;
  for (size_t s = 0; s < v.size(); ++s) {
    const Json& t = v[s];
    if (t.is_null()) {
      out.push_back(std::nullopt);
      continue;
    }
    if (!IsNumber(t) || !std::isfinite(AsDouble(t))) {
      Fail(name + "[" + std::to_string(s) + "] must be a finite number or None, got " +
           Repr(t) + ".");
    }
    out.push_back(AsDouble(t));
  }
  return out;
}

ExitRule ParseRule(const Json& d) {
  if (!d.is_object()) Fail("must be a JSON object.");
  static const std::set<std::string> known = {"metric", "thresholds", "target_agreement",
                                              "cold_thresholds", "metric_params",
                                              "instance_thresholds"};
  std::vector<std::string> unknown;
  for (auto it = d.begin(); it != d.end(); ++it) {
    if (!known.count(it.key())) unknown.push_back(it.key());
  }
  if (!unknown.empty()) {
    std::sort(unknown.begin(), unknown.end());
    Fail("Unknown exit rule fields: " + Listing(unknown) + ".");
  }
  ExitRule rule;
  const Json& metric = Key(d, "metric");
  std::string m = metric.is_string() ? metric.get<std::string>() : "";
  if (m == "top1") {
    rule.metric = Metric::kTop1;
  } else if (m == "margin") {
    rule.metric = Metric::kMargin;
  } else if (m == "layer_aware") {
    rule.metric = Metric::kLayerAware;
  } else {
    Fail("Unknown exit metric " + Repr(metric) + "; known: ['top1', 'margin', 'layer_aware'].");
  }
  const Json& thresholds = Key(d, "thresholds");
  rule.target_agreement = PyFloat(Key(d, "target_agreement"), "target_agreement");
  if (d.contains("metric_params") && !d["metric_params"].is_null()) {
    const Json& params = d["metric_params"];
    if (!params.is_array()) Fail("TypeError: metric_params must be a list, got " + Repr(params));
    std::vector<std::vector<float>> ps;
    for (size_t s = 0; s < params.size(); ++s) {
      int ndim = 0;
      size_t rows = 0, cols = 0;
      std::vector<float> p = Matrix(params[s], &ndim, &rows, &cols);
      bool finite = std::all_of(p.begin(), p.end(), [](float x) { return std::isfinite(x); });
      if (rule.metric == Metric::kLayerAware && (ndim != 2 || cols != 2 || !finite)) {
        Fail("metric_params[" + std::to_string(s) + "] must be a finite [C, 2] array, got "
             "shape (" + std::to_string(rows) + (ndim == 2 ? ", " + std::to_string(cols) + ")"
                                                           : ",)") + ".");
      }
      ps.push_back(std::move(p));
    }
    rule.metric_params = std::move(ps);
  }
  // ExitRule.__post_init__, in its order.
  if (!(rule.target_agreement > 0.0 && rule.target_agreement <= 1.0)) {
    Fail("target_agreement must be in (0, 1], got " + Num(rule.target_agreement) + ".");
  }
  rule.thresholds = ParseThresholds("thresholds", thresholds);
  if (d.contains("cold_thresholds") && !d["cold_thresholds"].is_null()) {
    rule.cold_thresholds = ParseThresholds("cold_thresholds", d["cold_thresholds"]);
  }
  if (d.contains("instance_thresholds") && !d["instance_thresholds"].is_null()) {
    rule.instance_thresholds = ParseThresholds("instance_thresholds", d["instance_thresholds"]);
  }
  try {
    rule.Validate();
  } catch (const Error& e) {
    Fail(e.what());
  }
  return rule;
}

CachePolicy ParsePolicy(const Json& in) {
  if (!in.is_object()) Fail("TypeError: a cache policy must be a JSON object, got " + Repr(in));
  static const std::set<std::string> names = {
      "decay", "exit_weight", "admit_min_confidence", "hot_min", "min_hot", "max_hot",
      "window", "grow_after", "prior_weight", "prior", "instance_slots", "instance_match",
      "instance_shift", "instance_min_confidence", "adapt_rate", "max_drift", "verify_rate",
      "verify_after"};
  std::vector<std::string> unknown;
  for (auto it = in.begin(); it != in.end(); ++it) {
    if (!names.count(it.key())) unknown.push_back(it.key());
  }
  if (!unknown.empty()) {
    std::sort(unknown.begin(), unknown.end());
    Fail("Unknown cache policy fields: " + Listing(unknown) + ".");
  }
  Json d = in;
  static const char* legacy[] = {"window", "grow_after", "prior_weight", "instance_slots",
                                 "instance_min_confidence", "instance_match", "instance_shift",
                                 "adapt_rate", "max_drift", "verify_rate", "verify_after"};
  bool any_legacy = false;
  for (const char* k : legacy) any_legacy = any_legacy || d.contains(k);
  if (!any_legacy) {
    // Written before the adaptive memory: a fixed-size hot set only.
    d["window"] = 20;
    d["grow_after"] = 2;
    d["prior_weight"] = 0.0;
    d["instance_slots"] = 0;
    d["instance_min_confidence"] = 0.9;
    d["instance_match"] = 0.95;
    d["instance_shift"] = 0.1;
    d["adapt_rate"] = 0.0;
    d["max_drift"] = 0.3;
    d["verify_rate"] = 0.0;
    d["verify_after"] = 0;
    d["min_hot"] = d.contains("max_hot") ? d["max_hot"] : Json(6);
  }
  if (!d.contains("instance_min_confidence")) d["instance_min_confidence"] = 0.0;
  if (!d.contains("prior")) d["prior"] = "share";
  if (!d.contains("admit_min_confidence")) d["admit_min_confidence"] = 0.0;
  if (!d.contains("verify_after")) d["verify_after"] = 0;
  if (!d.contains("instance_match")) d["instance_match"] = 0.95;
  if (!d.contains("instance_shift")) d["instance_shift"] = 0.1;
  std::vector<std::string> missing;
  for (const auto& n : names) {
    if (!d.contains(n)) missing.push_back(n);
  }
  if (!missing.empty()) {
    Fail("Missing cache policy fields: " + Listing(missing) +
         ". Re-convert the model with this version of smtm_tf.");
  }
  CachePolicy p;
  const Json& prior = d["prior"];
  std::string pr = prior.is_string() ? prior.get<std::string>() : "";
  if (pr == "share") {
    p.prior = Prior::kShare;
  } else if (pr == "contrast") {
    p.prior = Prior::kContrast;
  } else {
    Fail("prior must be one of ['share', 'contrast'], got " + Repr(prior) + ".");
  }
  const std::pair<const char*, double*> floats[] = {
      {"decay", &p.decay}, {"exit_weight", &p.exit_weight}, {"hot_min", &p.hot_min},
      {"prior_weight", &p.prior_weight}, {"adapt_rate", &p.adapt_rate},
      {"max_drift", &p.max_drift}, {"verify_rate", &p.verify_rate},
      {"instance_min_confidence", &p.instance_min_confidence},
      {"admit_min_confidence", &p.admit_min_confidence},
      {"instance_match", &p.instance_match}, {"instance_shift", &p.instance_shift}};
  for (const auto& [name, dst] : floats) {
    const Json& v = d[name];
    if (!IsNumber(v)) Fail(std::string(name) + " must be a number, got " + Repr(v) + ".");
    *dst = AsDouble(v);
    if (!std::isfinite(*dst)) Fail(std::string(name) + " must be finite, got " + Repr(v) + ".");
  }
  const std::pair<const char*, int64_t*> ints[] = {
      {"min_hot", &p.min_hot}, {"max_hot", &p.max_hot}, {"window", &p.window},
      {"grow_after", &p.grow_after}, {"instance_slots", &p.instance_slots},
      {"verify_after", &p.verify_after}};
  for (const auto& [name, dst] : ints) {
    const Json& v = d[name];
    if (!v.is_number_integer()) {
      Fail(std::string(name) + " must be a whole number, got " + Repr(v) + ".");
    }
    if (v.is_number_unsigned() && v.get<uint64_t>() > uint64_t(kMaxCount)) {
      Fail(std::string(name) + " must be <= " + std::to_string(kMaxCount) + ", got " +
           Repr(v) + ".");
    }
    *dst = v.get<int64_t>();
    if (*dst > kMaxCount) {
      Fail(std::string(name) + " must be <= " + std::to_string(kMaxCount) + ", got " +
           Repr(v) + ".");
    }
  }
  try {
    p.Validate();
  } catch (const Error& e) {
    Fail(e.what());
  }
  return p;
}

Preprocessing ParsePreprocessing(const Json& d) {
  if (!d.is_object() || d.size() != 3 || !d.contains("scale") || !d.contains("offset") ||
      !d.contains("source")) {
    Fail("PreprocessingError: preprocessing must be an object with exactly scale, offset and "
         "source, got " + Repr(d) + ".");
  }
  Preprocessing p;
  for (int k = 0; k < 2; ++k) {
    const char* field = k == 0 ? "scale" : "offset";
    const Json& v = d[field];
    std::vector<double>& dst = k == 0 ? p.scale : p.offset;
    dst.clear();
    if (!v.is_array()) {
      Fail(std::string("PreprocessingError: preprocessing.") + field + " must be numbers, got " +
           Repr(v) + ".");
    }
    for (const auto& x : v) {
      if (!IsNumber(x)) {
        Fail(std::string("PreprocessingError: preprocessing.") + field +
             " must be numbers, got " + Repr(v) + ".");
      }
      dst.push_back(AsDouble(x));
    }
    if (dst.empty() || !std::all_of(dst.begin(), dst.end(), [](double x) {
          return std::isfinite(x);
        })) {
      Fail(std::string("PreprocessingError: preprocessing.") + field +
           " must be finite numbers, got " + Repr(v) + ".");
    }
  }
  if (std::any_of(p.scale.begin(), p.scale.end(), [](double x) { return x == 0.0; })) {
    Fail("PreprocessingError: preprocessing.scale must not be 0, got " + Repr(d["scale"]) + ".");
  }
  if (p.scale.size() != p.offset.size() && p.scale.size() != 1 && p.offset.size() != 1) {
    Fail("PreprocessingError: preprocessing.scale has " + std::to_string(p.scale.size()) +
         " values and offset " + std::to_string(p.offset.size()) +
         ": give one per channel, or one for all.");
  }
  const Json& src = d["source"];
  if (!src.is_string() || src.get<std::string>().empty()) {
    Fail("PreprocessingError: preprocessing.source must be a name, got " + Repr(src) + ".");
  }
  p.source = src.get<std::string>();
  return p;
}

LookupOpSpec ParseLookup(const Json& d) {
  CheckFields("LookupOpSpec", d, {}, {"name", "version", "inputs", "outputs", "attributes"});
  LookupOpSpec op;
  int64_t version = At("version", [&] { return Whole(Key(d, "version"), "version"); });
  std::vector<TensorSpec> inputs = ParseTensors(d, "inputs");
  std::vector<TensorSpec> outputs = ParseTensors(d, "outputs");
  const Json& name = Key(d, "name");
  const Json& attributes = Key(d, "attributes");
  if (!name.is_string() || name.get<std::string>() != op.name) {
    Fail("the operator " + Repr(name) + " is unknown; this runtime implements '" + op.name +
             "'.", "name");
  }
  if (version != 1) {
    Fail(op.name + " version " + std::to_string(version) + " is unknown; this runtime "
         "implements versions [1]. Upgrade smtm_tf.", "version");
  }
  const std::vector<TensorSpec> want_in = {{"similarities", {-1}, "float32"},
                                           {"class_ids", {-1}, "int32"},
                                           {"stage", {}, "int32"}};
  const std::vector<TensorSpec> want_out = {{"class_id", {}, "int32"},
                                            {"score", {}, "float32"},
                                            {"exit", {}, "bool"}};
  if (inputs != want_in) {
    Fail("the tensors are not the " + op.name + " v1 inputs.", "inputs");
  }
  if (outputs != want_out) {
    Fail("the tensors are not the " + op.name + " v1 outputs.", "outputs");
  }
  if (!attributes.is_object()) Fail("attributes must be a JSON object.");
  if (attributes.contains("compare_with")) {
    const Json& c = attributes["compare_with"];
    if (!c.is_string() || c.get<std::string>() != "all_classes") {
      Fail(Repr(c) + " is unknown; this runtime compares with 'all_classes'.",
           "attributes.compare_with");
    }
  }
  op.version = static_cast<int>(version);
  return op;
}

// descriptor.py _nesting_depth: the deepest nesting of [ and { outside strings.
int NestingDepth(std::string_view text) {
  int depth = 0, deepest = 0;
  for (size_t i = 0; i < text.size(); ++i) {
    char c = text[i];
    if (c == '"') {
      // A string: skip to its closing quote (an unterminated one is not a string).
      size_t j = i + 1;
      while (j < text.size() && text[j] != '"' && text[j] != '\n') j += text[j] == '\\' ? 2 : 1;
      if (j < text.size() && text[j] == '"') {
        i = j;
        continue;
      }
    } else if (c == '[' || c == '{') {
      deepest = std::max(deepest, ++depth);
    } else if (c == ']' || c == '}') {
      --depth;
    }
  }
  return deepest;
}

// descriptor.py _non_finite: the path of the first non-finite number, or "".
bool NonFinite(const Json& v, const std::string& path, std::string* where) {
  if (v.is_number_float()) {
    if (std::isfinite(v.get<double>())) return false;
    *where = path.empty() ? "descriptor" : path;
    return true;
  }
  if (v.is_array()) {
    for (size_t i = 0; i < v.size(); ++i) {
      if (NonFinite(v[i], path + "[" + std::to_string(i) + "]", where)) return true;
    }
  } else if (v.is_object()) {
    for (auto it = v.begin(); it != v.end(); ++it) {
      if (NonFinite(it.value(), path.empty() ? it.key() : path + "." + it.key(), where)) {
        return true;
      }
    }
  }
  return false;
}

Descriptor FromChecked(const Json& d) {
  Descriptor out;
  out.exit_rule = At("exit_rule", [&] { return ParseRule(d["exit_rule"]); });
  if (d.contains("cache") && !d["cache"].is_null()) {
    out.cache = At("cache", [&] { return ParsePolicy(d["cache"]); });
  }
  out.preprocessing = At("preprocessing", [&] { return ParsePreprocessing(Key(d, "preprocessing")); });
  const Json& stages = d["stages"];
  if (!stages.is_array() || stages.size() > size_t(kMaxStages)) {
    Fail("must be a list of at most " + std::to_string(kMaxStages) + " stages.", "stages");
  }
  for (size_t s = 0; s < stages.size(); ++s) {
    out.stages.push_back(At("stages[" + std::to_string(s) + "]", [&] {
      return ParseStage(stages[s]);
    }));
  }
  out.head = At("head", [&] { return ParseSignature(d["head"]); });
  out.full = At("full", [&] { return ParseSignature(d["full"]); });
  out.lookup_op = At("lookup_op", [&] { return ParseLookup(d["lookup_op"]); });
  const Json& names = d["class_names"];
  if (!names.is_array()) Fail("must be a list of strings.", "class_names");
  const Json& quantization = Key(d, "quantization");

  // Descriptor.__post_init__.
  At("full", [&] {
    CheckNames(out.full, {"image"}, {"probabilities"});
    return 0;
  });
  int64_t channels = out.full.inputs[0].shape.empty() ? 0 : out.full.inputs[0].shape.back();
  for (int k = 0; k < 2; ++k) {
    size_t n = k == 0 ? out.preprocessing.scale.size() : out.preprocessing.offset.size();
    if (n != 1 && int64_t(n) != channels) {
      Fail(std::string("preprocessing.") + (k == 0 ? "scale" : "offset") + " has " +
           std::to_string(n) + " values for a model with " + std::to_string(channels) +
           " input channels: give one per channel, or one for all.");
    }
  }
  std::string q = quantization.is_string() ? quantization.get<std::string>() : "";
  static const std::set<std::string> quantizations = {"float32", "float16", "dynamic", "int8",
                                                      "qat"};
  if (!quantizations.count(q)) {
    Fail("quantization " + Repr(quantization) +
         " is not one of ['float32', 'float16', 'dynamic', 'int8', 'qat'].");
  }
  out.quantization = q;
  if (out.stages.empty()) Fail("A descriptor needs at least one stage.");
  if (out.exit_rule.uses_cache() && !out.cache) {
    Fail("exit_rule has cold thresholds but the descriptor no cache.");
  }
  if (out.exit_rule.thresholds.size() != out.stages.size()) {
    Fail("exit_rule has " + std::to_string(out.exit_rule.thresholds.size()) +
         " thresholds for " + std::to_string(out.stages.size()) + " stages.");
  }
  // class_names are read as given; their type is checked in _check_structure.
  size_t num_classes = names.size();
  if (out.exit_rule.metric_params) {
    const auto& params = *out.exit_rule.metric_params;
    for (size_t s = 0; s < params.size(); ++s) {
      if (params[s].size() / 2 != num_classes) {
        Fail("exit_rule.metric_params[" + std::to_string(s) + "] covers " +
             std::to_string(params[s].size() / 2) + " classes, the descriptor has " +
             std::to_string(num_classes) + ".");
      }
    }
  }
  for (size_t s = 0; s < out.stages.size(); ++s) {
    if (size_t(out.stages[s].num_classes) != num_classes) {
      Fail("stages[" + std::to_string(s) + "] holds " +
           std::to_string(out.stages[s].num_classes) + " centres for " +
           std::to_string(num_classes) + " classes.");
    }
  }
  // _check_structure.
  out.model_name = Text(d["model_name"], "model_name");
  out.pooling = Text(d["pooling"], "pooling");
  if (num_classes < 1 || num_classes > size_t(kMaxClasses) ||
      !std::all_of(names.begin(), names.end(), [](const Json& n) { return n.is_string(); })) {
    Fail("must be 1 to " + std::to_string(kMaxClasses) + " strings.", "class_names");
  }
  for (const auto& n : names) out.class_names.push_back(n.get<std::string>());
  At("head", [&] {
    CheckNames(out.head, {"activation"}, {"probabilities"});
    return 0;
  });
  std::vector<std::string> keys;
  for (const auto& st : out.stages) keys.push_back(st.signature.key);
  keys.push_back(out.head.key);
  keys.push_back(out.full.key);
  if (std::set<std::string>(keys.begin(), keys.end()).size() != keys.size()) {
    Fail("signature keys " + Listing(keys) + " name one signature twice.");
  }
  const std::vector<int64_t> k1 = {int64_t(num_classes)};
  for (int i = 0; i < 2; ++i) {
    const SignatureSpec& sig = i == 0 ? out.head : out.full;
    if (sig.outputs[0].shape != k1) {
      Fail("shape " + ShapeText(sig.outputs[0].shape) + ", the descriptor has " +
               std::to_string(num_classes) + " classes.",
           std::string(i == 0 ? "head" : "full") + ".outputs[0]");
    }
  }
  std::vector<int64_t> given = out.full.inputs[0].shape;
  std::string by = "full.inputs[0] (image)";
  for (size_t s = 0; s < out.stages.size(); ++s) {
    const SignatureSpec& sig = out.stages[s].signature;
    std::string field = "stages[" + std::to_string(s) + "].signature";
    if (sig.key != "stage_" + std::to_string(s)) {
      Fail("key " + Quoted(sig.key) + ": stage " + std::to_string(s) +
               " is the signature 'stage_" + std::to_string(s) + "'.", field);
    }
    const auto& taken = sig.Input("activation")->shape;
    if (taken != given) {
      Fail("activation shape " + ShapeText(taken) + " is not that of " + by + ", " +
               ShapeText(given) + ".", field);
    }
    given = sig.Output("next_activation")->shape;
    by = "stages[" + std::to_string(s) + "] next_activation";
  }
  if (out.head.inputs[0].shape != given) {
    Fail("activation shape " + ShapeText(out.head.inputs[0].shape) + " is not that of " + by +
             ", " + ShapeText(given) + ".", "head");
  }
  return out;
}

}  // namespace

const char* MetricName(Metric m) {
  switch (m) {
    case Metric::kTop1: return "top1";
    case Metric::kMargin: return "margin";
    case Metric::kLayerAware: return "layer_aware";
  }
  return "?";
}

const TensorSpec* SignatureSpec::Input(std::string_view name) const {
  for (const auto& t : inputs) {
    if (t.name == name) return &t;
  }
  return nullptr;
}

const TensorSpec* SignatureSpec::Output(std::string_view name) const {
  for (const auto& t : outputs) {
    if (t.name == name) return &t;
  }
  return nullptr;
}

std::optional<double> ExitRule::ThresholdFor(int stage, bool hot) const {
  if (hot || !cold_thresholds) return thresholds[stage];
  return (*cold_thresholds)[stage];
}

void ExitRule::Validate() const {
  auto fail = [](const std::string& m) { throw Error(Error::Code::kArgument, m); };
  if (!(target_agreement > 0.0 && target_agreement <= 1.0)) {
    fail("target_agreement must be in (0, 1], got " + Num(target_agreement) + ".");
  }
  auto check = [&](const char* name, const Thresholds& t) {
    for (size_t s = 0; s < t.size(); ++s) {
      if (t[s] && !std::isfinite(*t[s])) {
        fail(std::string(name) + "[" + std::to_string(s) + "] must be a finite number or None.");
      }
    }
  };
  check("thresholds", thresholds);
  if (cold_thresholds) {
    check("cold_thresholds", *cold_thresholds);
    if (cold_thresholds->size() != thresholds.size()) {
      fail("cold_thresholds has " + std::to_string(cold_thresholds->size()) +
           " entries for " + std::to_string(thresholds.size()) + " stages.");
    }
  }
  if (instance_thresholds) {
    check("instance_thresholds", *instance_thresholds);
    if (instance_thresholds->size() != thresholds.size()) {
      fail("instance_thresholds has " + std::to_string(instance_thresholds->size()) +
           " entries for " + std::to_string(thresholds.size()) + " stages.");
    }
  }
  if (metric == Metric::kLayerAware) {
    if (!metric_params || metric_params->size() != thresholds.size()) {
      fail("The layer_aware metric needs metric_params: one [C, 2] array per stage.");
    }
    for (size_t s = 0; s < metric_params->size(); ++s) {
      const auto& p = (*metric_params)[s];
      if (p.size() % 2 != 0 ||
          !std::all_of(p.begin(), p.end(), [](float x) { return std::isfinite(x); })) {
        fail("metric_params[" + std::to_string(s) + "] must be a finite [C, 2] array.");
      }
    }
  } else if (metric_params) {
    fail(std::string("The ") + MetricName(metric) + " metric takes no metric_params.");
  }
}

CachePolicy CachePolicy::NoCache() {
  CachePolicy p;
  p.max_hot = 0;
  p.min_hot = 0;
  p.instance_slots = 0;
  p.verify_after = 0;
  return p;
}

void CachePolicy::Validate() const {
  auto fail = [](const std::string& m) { throw Error(Error::Code::kArgument, m); };
  const std::pair<const char*, double> floats[] = {
      {"decay", decay}, {"exit_weight", exit_weight}, {"hot_min", hot_min},
      {"prior_weight", prior_weight}, {"adapt_rate", adapt_rate}, {"max_drift", max_drift},
      {"verify_rate", verify_rate}, {"instance_min_confidence", instance_min_confidence},
      {"admit_min_confidence", admit_min_confidence}, {"instance_match", instance_match},
      {"instance_shift", instance_shift}};
  for (const auto& [name, v] : floats) {
    if (!std::isfinite(v)) fail(std::string(name) + " must be finite, got " + Num(v) + ".");
  }
  const std::pair<const char*, int64_t> ints[] = {
      {"min_hot", min_hot}, {"max_hot", max_hot}, {"window", window},
      {"grow_after", grow_after}, {"instance_slots", instance_slots},
      {"verify_after", verify_after}};
  for (const auto& [name, v] : ints) {
    if (v > kMaxCount) {
      fail(std::string(name) + " must be <= " + std::to_string(kMaxCount) + ", got " +
           std::to_string(v) + ".");
    }
  }
  if (!(decay > 0.0 && decay < 1.0)) fail("decay must be in (0, 1), got " + Num(decay) + ".");
  const std::pair<const char*, double> unit[] = {
      {"exit_weight", exit_weight}, {"adapt_rate", adapt_rate}, {"verify_rate", verify_rate},
      {"instance_min_confidence", instance_min_confidence},
      {"admit_min_confidence", admit_min_confidence}};
  for (const auto& [name, v] : unit) {
    if (!(v >= 0.0 && v <= 1.0)) {
      fail(std::string(name) + " must be in [0, 1], got " + Num(v) + ".");
    }
  }
  if (!(hot_min > 0.0)) fail("hot_min must be > 0, got " + Num(hot_min) + ".");
  if (max_hot < 0) fail("max_hot must be >= 0, got " + std::to_string(max_hot) + ".");
  if (instance_slots < 0) {
    fail("instance_slots must be >= 0, got " + std::to_string(instance_slots) + ".");
  }
  if (prior_weight < 0) fail("prior_weight must be >= 0, got " + Num(prior_weight) + ".");
  if (verify_after < 0) fail("verify_after must be >= 0, got " + std::to_string(verify_after) + ".");
  if (!(0 <= min_hot && min_hot <= max_hot)) {
    fail("Need 0 <= min_hot <= max_hot, got min_hot=" + std::to_string(min_hot) +
         ", max_hot=" + std::to_string(max_hot) + ".");
  }
  if (window < 1 || grow_after < 1) fail("window and grow_after must be >= 1.");
  if (!(instance_match >= -1.0 && instance_match <= 1.0) ||
      !(instance_shift >= 0.0 && instance_shift <= 2.0)) {
    fail("instance_match must be in [-1, 1] and instance_shift in [0, 2], got " +
         Num(instance_match) + ", " + Num(instance_shift) + ".");
  }
  if (!(max_drift >= 0.0 && max_drift <= 2.0)) {
    fail("max_drift must be in [0, 2], got " + Num(max_drift) + ".");
  }
}

namespace {

// Untrusted JSON text (a descriptor, an exit rule): bounded in size and
// depth, valid, with finite numbers only. `what` names it in messages.
Json ParseBounded(std::string_view text, const std::string& what) {
  if (text.size() > kMaxDescriptorBytes) {
    Fail("The " + what + " is " + std::to_string(text.size()) + " bytes, at most " +
         std::to_string(kMaxDescriptorBytes) + ".");
  }
  int depth = NestingDepth(text);
  if (depth > kMaxJsonDepth) {
    Fail("The " + what + " nests " + std::to_string(depth) + " levels deep, at most " +
         std::to_string(kMaxJsonDepth) + ".");
  }
  Json d;
  try {
    d = Json::parse(text.begin(), text.end(), nullptr, true, false);
  } catch (const nlohmann::json::exception& e) {
    Fail("The " + what + " is not valid JSON: " + e.what());
  }
  std::string where;
  if (NonFinite(d, "", &where)) {
    Fail("holds a non-finite number (NaN or Infinity); " + what + "s hold finite numbers only.",
         where);
  }
  return d;
}

}  // namespace

Descriptor Descriptor::Parse(std::string_view text) {
  try {
    Json d = ParseBounded(text, "descriptor");
    // Descriptor.from_dict.
    if (!d.is_object()) {
      Fail(std::string("A descriptor must be a JSON object, got ") +
           (d.is_array() ? "list" : d.is_string() ? "str" : d.is_null() ? "NoneType"
            : d.is_boolean() ? "bool" : d.is_number_float() ? "float" : "int") + ".");
    }
    const Json* version = d.contains("schema_version") ? &d["schema_version"] : nullptr;
    double v = version && IsNumber(*version) ? AsDouble(*version) : 0.0;
    if (!version || !IsNumber(*version) || (v != 1.0 && v != 2.0)) {
      Fail("Descriptor schema_version " + (version ? Repr(*version) : std::string("None")) +
           " is not supported; this smtm_tf reads versions [1, 2]. Re-convert the model with "
           "this version of smtm_tf, or upgrade smtm_tf.");
    }
    if (v == 1.0) {
      if (d.contains("preprocessing")) Fail("A version-1 descriptor has no preprocessing field.");
      d["preprocessing"] = Json{{"scale", {1.0}}, {"offset", {0.0}}, {"source", "raw"}};
    }
    CheckFields("Descriptor", d,
                {"model_name", "class_names", "pooling", "stages", "head", "full", "exit_rule",
                 "lookup_op"},
                {"quantization", "cache", "preprocessing", "schema_version"});
    return FromChecked(d);
  } catch (const DescError& e) {
    throw Error(Error::Code::kModelFile, e.field.empty() ? e.reason : e.field + ": " + e.reason);
  } catch (const Error& e) {
    throw;
  } catch (const std::exception& e) {
    throw Error(Error::Code::kModelFile,
                std::string("Malformed descriptor (") + e.what() + "). Re-convert the model.");
  }
}

RuleChoice RuleChoice::Parse(std::string_view text) {
  try {
    Json d = ParseBounded(text, "exit rule");
    CheckFields("Exit rule choice", d, {"exit_rule"}, {"cache"});
    RuleChoice out;
    out.rule = At("exit_rule", [&] { return ParseRule(d["exit_rule"]); });
    if (out.rule.uses_cache() && d.contains("cache") && !d["cache"].is_null()) {
      out.policy = At("cache", [&] { return ParsePolicy(d["cache"]); });
    }
    return out;
  } catch (const DescError& e) {
    throw Error(Error::Code::kArgument, e.field.empty() ? e.reason : e.field + ": " + e.reason);
  } catch (const Error& e) {
    throw Error(Error::Code::kArgument, e.what());
  } catch (const std::exception& e) {
    throw Error(Error::Code::kArgument, std::string("Malformed exit rule (") + e.what() + ").");
  }
}

namespace {

// Python's repr of a float (the shortest digits that read back, fixed
// notation for exponents -4..15 with at least one decimal, else d.ddde+XX).
std::string PyFloat(double v) {
  char buf[64];
  auto r = std::to_chars(buf, buf + sizeof buf, v, std::chars_format::scientific);
  std::string sci(buf, r.ptr);  // [-]d[.ddd]e[+-]XX
  const bool negative = sci[0] == '-';
  if (negative) sci.erase(0, 1);
  const size_t e = sci.find('e');
  std::string digits = sci.substr(0, e);
  digits.erase(std::remove(digits.begin(), digits.end(), '.'), digits.end());
  const int exponent = std::stoi(sci.substr(e + 1));
  std::string out;
  if (exponent >= -4 && exponent < 16) {
    if (exponent >= 0) {
      if (digits.size() < size_t(exponent) + 1) digits.append(size_t(exponent) + 1 - digits.size(), '0');
      std::string rest = digits.substr(size_t(exponent) + 1);
      out = digits.substr(0, size_t(exponent) + 1) + "." + (rest.empty() ? "0" : rest);
    } else {
      out = "0." + std::string(size_t(-exponent - 1), '0') + digits;
    }
  } else {
    out = digits.substr(0, 1) + (digits.size() > 1 ? "." + digits.substr(1) : "") + "e" +
          (exponent < 0 ? "-" : "+") + (std::abs(exponent) < 10 ? "0" : "") +
          std::to_string(std::abs(exponent));
  }
  return negative ? "-" + out : out;
}

// float(str(np.float32(v))): the float32's shortest digits, read as a double.
std::string PyFloat32(float v) {
  char buf[64];
  auto r = std::to_chars(buf, buf + sizeof buf, v);
  return PyFloat(std::strtod(std::string(buf, r.ptr).c_str(), nullptr));
}

std::string PyList(const Thresholds& t) {
  std::string out = "[";
  for (size_t i = 0; i < t.size(); ++i) {
    out += (i ? "," : "") + (t[i] ? PyFloat(*t[i]) : std::string("null"));
  }
  return out + "]";
}

}  // namespace

std::string RuleChoice::CanonicalJson() const {
  // Keys in sorted order, as sort_keys=True writes them.
  std::string r = "{";
  if (rule.cold_thresholds) r += "\"cold_thresholds\":" + PyList(*rule.cold_thresholds) + ",";
  if (rule.instance_thresholds) {
    r += "\"instance_thresholds\":" + PyList(*rule.instance_thresholds) + ",";
  }
  r += "\"metric\":\"" + std::string(MetricName(rule.metric)) + "\",";
  if (rule.metric_params) {
    r += "\"metric_params\":[";
    for (size_t s = 0; s < rule.metric_params->size(); ++s) {
      const auto& p = (*rule.metric_params)[s];
      r += s ? ",[" : "[";
      for (size_t c = 0; c + 1 < p.size(); c += 2) {
        r += (c ? ",[" : "[") + PyFloat32(p[c]) + "," + PyFloat32(p[c + 1]) + "]";
      }
      r += "]";
    }
    r += "],";
  }
  r += "\"target_agreement\":" + PyFloat(rule.target_agreement) + ",\"thresholds\":" +
       PyList(rule.thresholds) + "}";
  std::string p = "null";
  if (policy) {
    const CachePolicy& c = *policy;
    p = "{\"adapt_rate\":" + PyFloat(c.adapt_rate) +
        ",\"admit_min_confidence\":" + PyFloat(c.admit_min_confidence) +
        ",\"decay\":" + PyFloat(c.decay) + ",\"exit_weight\":" + PyFloat(c.exit_weight) +
        ",\"grow_after\":" + std::to_string(c.grow_after) + ",\"hot_min\":" + PyFloat(c.hot_min) +
        ",\"instance_match\":" + PyFloat(c.instance_match) +
        ",\"instance_min_confidence\":" + PyFloat(c.instance_min_confidence) +
        ",\"instance_shift\":" + PyFloat(c.instance_shift) +
        ",\"instance_slots\":" + std::to_string(c.instance_slots) +
        ",\"max_drift\":" + PyFloat(c.max_drift) + ",\"max_hot\":" + std::to_string(c.max_hot) +
        ",\"min_hot\":" + std::to_string(c.min_hot) + ",\"prior\":\"" +
        (c.prior == Prior::kContrast ? "contrast" : "share") +
        "\",\"prior_weight\":" + PyFloat(c.prior_weight) +
        ",\"verify_after\":" + std::to_string(c.verify_after) +
        ",\"verify_rate\":" + PyFloat(c.verify_rate) +
        ",\"window\":" + std::to_string(c.window) + "}";
  }
  return "[" + r + "," + p + "]";
}

}  // namespace smtm
