#include <functional>
#include <string>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "smtm/descriptor.h"
#include "smtm/error.h"
#include "test_util.h"

namespace smtm {
namespace {

using Json = nlohmann::ordered_json;
using testing::DataPath;
using testing::ReadFile;

std::string Fixture() { return ReadFile(DataPath("memory_trace_margin_share.json")); }

TEST(DescriptorTest, ParsesEveryField) {
  const Descriptor d = Descriptor::Parse(Fixture());
  EXPECT_EQ(d.model_name, "replay");
  EXPECT_EQ(d.num_classes(), 10);
  EXPECT_EQ(d.num_stages(), 3);
  EXPECT_EQ(d.embedding_dim(), 16);
  EXPECT_EQ(d.stages[1].signature.key, "stage_1");
  EXPECT_EQ(d.stages[1].signature.Output("similarities")->shape, std::vector<int64_t>{10});
  EXPECT_EQ(d.full.inputs[0].shape, (std::vector<int64_t>{1, 8, 8, 1}));
  EXPECT_EQ(d.exit_rule.metric, Metric::kMargin);
  ASSERT_TRUE(d.exit_rule.uses_cache());
  EXPECT_EQ(*d.exit_rule.ThresholdFor(0, false), 0.8);
  EXPECT_FALSE((*d.exit_rule.instance_thresholds)[2].has_value());
  ASSERT_TRUE(d.cache.has_value());
  EXPECT_EQ(d.cache->instance_slots, 3);
  EXPECT_EQ(d.cache->verify_after, 6);
  EXPECT_EQ(d.cache->prior, Prior::kShare);
  EXPECT_EQ(d.preprocessing.scale, std::vector<double>{1.0 / 255});
  EXPECT_EQ(d.stages[0].centres.size(), 160u);
  EXPECT_EQ(d.stages[0].centres[7 * 16], 0.0f);  // The zero row.
}

TEST(DescriptorTest, LegacyCachePolicyGetsThePythonDefaults) {
  Json d = Json::parse(Fixture());
  d["cache"] = Json{{"decay", 0.9}, {"exit_weight", 0.25}, {"hot_min", 0.3}, {"min_hot", 1},
                    {"max_hot", 5}};
  const Descriptor parsed = Descriptor::Parse(d.dump());
  EXPECT_EQ(parsed.cache->min_hot, 5);  // A fixed-size hot set.
  EXPECT_EQ(parsed.cache->window, 20);
  EXPECT_EQ(parsed.cache->prior_weight, 0.0);
  EXPECT_EQ(parsed.cache->admit_min_confidence, 0.0);
}

struct BadCase {
  const char* name;
  std::function<void(Json&)> mutate;
  const char* message;  // What the error must say (Python's message).
};

class BadDescriptorTest : public ::testing::TestWithParam<BadCase> {};

TEST_P(BadDescriptorTest, IsRefusedNamingTheField) {
  Json d = Json::parse(Fixture());
  GetParam().mutate(d);
  try {
    Descriptor::Parse(d.dump());
    FAIL() << "accepted";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), Error::Code::kModelFile);
    EXPECT_NE(std::string(e.what()).find(GetParam().message), std::string::npos) << e.what();
  }
}

void ScaleRow(Json& d) {
  for (auto& v : d["stages"][1]["centres"][3]) v = v.get<double>() * 2;
}

INSTANTIATE_TEST_SUITE_P(
    Cases, BadDescriptorTest,
    ::testing::Values(
        BadCase{"version", [](Json& d) { d["schema_version"] = 3; },
                "Descriptor schema_version 3 is not supported"},
        BadCase{"bool_version", [](Json& d) { d["schema_version"] = true; },
                "schema_version True is not supported"},
        BadCase{"missing", [](Json& d) { d.erase("model_name"); },
                "Descriptor: unknown fields [], missing fields ['model_name']."},
        BadCase{"unknown", [](Json& d) { d["bogus"] = 1; }, "unknown fields ['bogus']"},
        BadCase{"not_unit", ScaleRow, "stages[1].centres: row 3 is not unit-norm (norm 2)."},
        BadCase{"ragged", [](Json& d) { d["stages"][0]["centres"][2].erase(0); },
                "stages[0].centres:"},
        BadCase{"thresholds", [](Json& d) { d["exit_rule"]["thresholds"].erase(0); },
                "exit_rule: cold_thresholds has 3 entries for 2 stages."},
        BadCase{"stage_count", [](Json& d) {
                  for (const char* k : {"thresholds", "cold_thresholds", "instance_thresholds"}) {
                    d["exit_rule"][k].erase(0);
                  } },
                "exit_rule has 2 thresholds for 3 stages."},
        BadCase{"decay", [](Json& d) { d["cache"]["decay"] = 1.5; },
                "cache: decay must be in (0, 1), got 1.5."},
        BadCase{"int_as_float", [](Json& d) { d["cache"]["window"] = 10.0; },
                "cache: window must be a whole number"},
        BadCase{"no_cache", [](Json& d) { d["cache"] = nullptr; },
                "exit_rule has cold thresholds but the descriptor no cache."},
        BadCase{"op_version", [](Json& d) { d["lookup_op"]["version"] = 2; },
                "lookup_op.version: SMTM_CACHE_LOOKUP version 2 is unknown"},
        BadCase{"op_compare", [](Json& d) { d["lookup_op"]["attributes"]["compare_with"] = "hot"; },
                "lookup_op.attributes.compare_with: 'hot' is unknown"},
        BadCase{"stage_key", [](Json& d) { d["stages"][0]["signature"]["key"] = "stage_9"; },
                "stages[0].signature: key 'stage_9': stage 0 is the signature 'stage_0'."},
        BadCase{"shape", [](Json& d) { d["stages"][0]["signature"]["inputs"][0]["shape"][1] = "a"; },
                "stages[0].signature.inputs[0]: shape[1] must be a whole number, got 'a'."},
        BadCase{"dim", [](Json& d) {
                  d["stages"][0]["signature"]["inputs"][0]["shape"][1] = (1 << 20) + 1; },
                "shape[1] must be in [-1, 1048576]"},
        BadCase{"centres_shape", [](Json& d) {
                  d["stages"][2]["signature"]["inputs"][1]["shape"] = {10, 15}; },
                "stages[2].signature.inputs: 'centres' has shape [10, 15]"},
        BadCase{"chain", [](Json& d) { d["head"]["inputs"][0]["shape"] = {1, 3}; },
                "head: activation shape [1, 3] is not that of stages[2] next_activation"},
        BadCase{"class_names", [](Json& d) { d["class_names"][0] = 1; },
                "class_names: must be 1 to 100000 strings."},
        BadCase{"classes", [](Json& d) { d["class_names"].erase(0); },
                "holds 10 centres for 9 classes."},
        BadCase{"metric", [](Json& d) { d["exit_rule"]["metric"] = "foo"; },
                "exit_rule: Unknown exit metric 'foo'"},
        BadCase{"layer_aware", [](Json& d) { d["exit_rule"]["metric"] = "layer_aware"; },
                "exit_rule: The layer_aware metric needs metric_params"},
        BadCase{"threshold_type", [](Json& d) { d["exit_rule"]["thresholds"][0] = "0.5"; },
                "exit_rule: thresholds[0] must be a finite number or None"},
        BadCase{"target", [](Json& d) { d["exit_rule"]["target_agreement"] = 0; },
                "exit_rule: target_agreement must be in (0, 1], got 0."},
        BadCase{"scale", [](Json& d) { d["preprocessing"]["scale"] = {0}; },
                "preprocessing.scale must not be 0"},
        BadCase{"channels", [](Json& d) { d["preprocessing"]["offset"] = {0, 0, 0}; },
                "preprocessing.offset has 3 values for a model with 1 input channels"},
        BadCase{"quantization", [](Json& d) { d["quantization"] = "int4"; },
                "quantization 'int4' is not one of"},
        BadCase{"cost", [](Json& d) { d["stages"][1]["cost"] = -1; },
                "stages[1]: cost must be >= 0, got -1."},
        BadCase{"tensor_names", [](Json& d) {
                  d["stages"][0]["signature"]["outputs"][0]["name"] = "semantic"; },
                "stages[0].signature.outputs: signature 'stage_0' must have the tensors"},
        BadCase{"duplicate_keys", [](Json& d) { d["head"]["key"] = "full"; },
                "name one signature twice"},
        BadCase{"v1_preprocessing", [](Json& d) { d["schema_version"] = 1; },
                "A version-1 descriptor has no preprocessing field."}),
    [](const ::testing::TestParamInfo<BadCase>& info) { return std::string(info.param.name); });

TEST(DescriptorTest, RefusesBadText) {
  auto message = [](const std::string& text) {
    try {
      Descriptor::Parse(text);
    } catch (const Error& e) {
      EXPECT_EQ(e.code(), Error::Code::kModelFile);
      return std::string(e.what());
    }
    return std::string("accepted");
  };
  EXPECT_NE(message("{").find("not valid JSON"), std::string::npos);
  EXPECT_NE(message("\xff\xfe").find("not valid JSON"), std::string::npos);
  EXPECT_NE(message("[1e400]").find("not valid JSON"), std::string::npos);
  EXPECT_NE(message(std::string(17, '[') + std::string(17, ']')).find("nests 17 levels deep"),
            std::string::npos);
  // Brackets inside strings do not count.
  EXPECT_NE(message("{\"x\": \"" + std::string(40, '[') + "\"}").find("schema_version None"),
            std::string::npos);
  EXPECT_NE(message("[]").find("must be a JSON object, got list"), std::string::npos);
  EXPECT_NE(message(std::string(kMaxDescriptorBytes + 1, ' ')).find("bytes, at most"),
            std::string::npos);
}

TEST(DescriptorTest, ReadsVersionOne) {
  Json d = Json::parse(Fixture());
  d["schema_version"] = 1;
  d.erase("preprocessing");
  const Descriptor parsed = Descriptor::Parse(d.dump());
  EXPECT_TRUE(parsed.preprocessing.IsIdentity());
  EXPECT_EQ(parsed.schema_version, 2);
}

}  // namespace
}  // namespace smtm

namespace smtm {
namespace {

// Mutations of the replay descriptors and Python's verdict on each
// (make_memory_trace.py descriptor_cases): the native parser must accept
// exactly what Python accepts.
class ParityTest : public ::testing::TestWithParam<const char*> {};

TEST_P(ParityTest, AcceptsExactlyWhatPythonAccepts) {
  const std::string base_name = std::string("memory_trace_") + GetParam();
  const Json base = Json::parse(ReadFile(DataPath(base_name + ".json")));
  const Json cases = Json::parse(ReadFile(DataPath(base_name + "_cases.json")));
  int same_message = 0, refused = 0;
  for (const auto& c : cases) {
    const std::string text = base.patch(c["patch"]).dump();
    const std::string python = c["python"].get<std::string>();
    std::string native = "ok";
    try {
      Descriptor::Parse(text);
    } catch (const Error& e) {
      native = e.what();
    }
    ASSERT_EQ(native == "ok", python == "ok")
        << c["patch"].dump() << "\n python: " << python << "\n native: " << native;
    if (python == "ok") continue;
    ++refused;
    same_message += native == python;
    // Where Python names a field, the native message names the same one.
    const size_t colon = python.find(": ");
    const std::string field = python.substr(0, colon);
    if (colon != std::string::npos && field.find(' ') == std::string::npos) {
      EXPECT_EQ(native.substr(0, colon + 2), python.substr(0, colon + 2))
          << c["patch"].dump() << "\n python: " << python << "\n native: " << native;
    }
  }
  std::printf("[ parity   ] %s: %d refusals, %d with Python's exact message\n", GetParam(),
              refused, same_message);
}

INSTANTIATE_TEST_SUITE_P(Descriptors, ParityTest,
                         ::testing::Values("margin_share", "layer_aware_contrast", "top1_nocache"));

}  // namespace
}  // namespace smtm

namespace smtm {
namespace {

TEST(RuleChoiceTest, CanonicalJsonIsPythonsJsonDumps) {
  // The expected text is what Python prints for the same rule:
  // json.dumps([rule, None], sort_keys=True, separators=(",", ":")).
  RuleChoice c = RuleChoice::Parse(
      R"({"exit_rule": {"thresholds": [1e16, 0.00001, 0.0001, 100, null, -2.5,
          123456789012345.6, 1.5e-7], "metric": "margin", "target_agreement": 0.99},
          "cache": {"decay": 0.5}})");
  EXPECT_FALSE(c.policy.has_value());  // No cold thresholds: the policy is dropped.
  EXPECT_EQ(c.CanonicalJson(),
            R"([{"metric":"margin","target_agreement":0.99,"thresholds":[1e+16,1e-05,0.0001,)"
            R"(100.0,null,-2.5,123456789012345.6,1.5e-07]},null])");
}

TEST(RuleChoiceTest, RefusesWhatIsNotARuleChoice) {
  const char* bad[] = {"", "[]", "{}", R"({"exit_rule": 3})", R"({"exit_rule": {}, "x": 1})",
                       R"({"exit_rule": {"metric": "margin", "thresholds": [NaN]}})"};
  for (const char* text : bad) {
    try {
      RuleChoice::Parse(text);
      ADD_FAILURE() << "parsed: " << text;
    } catch (const Error& e) {
      EXPECT_EQ(e.code(), Error::Code::kArgument) << text;
    }
  }
}

}  // namespace
}  // namespace smtm
