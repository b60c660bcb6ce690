#include <string>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "smtm/digest.h"
#include "smtm/error.h"
#include "test_util.h"

namespace smtm {
namespace {

using testing::DataPath;
using testing::ReadFile;

TEST(Sha256Test, StandardVectors) {
  // FIPS 180-2 appendix B and the empty message.
  EXPECT_EQ(Sha256Hex("", 0), "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
  EXPECT_EQ(Sha256Hex("abc", 3),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
  const std::string two_blocks = "abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq";
  EXPECT_EQ(Sha256Hex(two_blocks.data(), two_blocks.size()),
            "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1");
  const std::string million(1000000, 'a');
  EXPECT_EQ(Sha256Hex(million.data(), million.size()),
            "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0");
  // Lengths around the padding boundary (55, 56, 63, 64 bytes).
  EXPECT_EQ(Sha256Hex(std::string(55, 'a').data(), 55),
            "9f4390f8d30c2dd92ec9f095b65e2b9ae9b0a925a5258e241c9f1e910f734318");
  EXPECT_EQ(Sha256Hex(std::string(56, 'a').data(), 56),
            "b35439a4ac6f0948b6d6f9e3c6af0f5f590ce20f1bde7090ef7970686ec6738a");
  EXPECT_EQ(Sha256Hex(std::string(64, 'a').data(), 64),
            "ffe054fe7ae0cb6dc65c3af9b61d5209f439851db43d0ba5997337df154668eb");
}

// Models with each kind of integrity record: "buffers" (content_digest) and
// "file" (the whole-file record), written by make_memory_trace.py.
class ModelDigestTest : public ::testing::TestWithParam<const char*> {
 protected:
  void SetUp() override {
    const std::string base = std::string("model_with_") + GetParam() + "_digest";
    model_ = ReadFile(DataPath(base + ".bin"));
    expected_ = nlohmann::json::parse(ReadFile(DataPath(base + ".json")));
  }
  bool file_kind() const { return std::string(GetParam()) == "file"; }
  const uint8_t* bytes() const { return reinterpret_cast<const uint8_t*>(model_.data()); }
  std::string model_;
  nlohmann::json expected_;
};

TEST_P(ModelDigestTest, MatchesPythonsDigests) {
  EXPECT_EQ(ContentDigest(bytes(), model_.size()), expected_["content_digest"].get<std::string>());
  auto stored = ReadMetadata(bytes(), model_.size(), kDigestName);
  ASSERT_TRUE(stored.has_value());
  EXPECT_EQ(*stored, expected_["stored_digest"].get<std::string>());
  EXPECT_EQ(stored->rfind(kDigestFilePrefix, 0) == 0, file_kind());
  EXPECT_EQ(CheckDigest(bytes(), model_.size()), DigestStatus::kOk);
}

TEST_P(ModelDigestTest, AnyDamagedByteOutsideTheRecordIsAMismatch) {
  // The whole-file record covers every byte; the buffers record the buffers.
  std::string damaged = model_;
  // The file's last byte (graph structure, not a buffer) / a weight.
  const size_t at = file_kind() ? damaged.size() - 1 : damaged.find("weights");
  damaged[at] = char(damaged[at] ^ 1);
  DigestStatus status = DigestStatus::kOk;
  try {
    status = CheckDigest(reinterpret_cast<const uint8_t*>(damaged.data()), damaged.size());
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), Error::Code::kModelFile);
    status = DigestStatus::kMismatch;
  }
  EXPECT_EQ(status, DigestStatus::kMismatch);
  // A damaged record is a mismatch too.
  std::string record = ReadMetadata(bytes(), model_.size(), kDigestName).value();
  std::string bad = model_;
  size_t pos = bad.find(record);
  ASSERT_NE(pos, std::string::npos);
  bad[pos + record.size() - 1] = bad[pos + record.size() - 1] == '0' ? '1' : '0';
  EXPECT_EQ(CheckDigest(reinterpret_cast<const uint8_t*>(bad.data()), bad.size()),
            DigestStatus::kMismatch);
}

TEST_P(ModelDigestTest, ReadsTheDescriptorEntry) {
  auto text = ReadMetadata(bytes(), model_.size(), kDescriptorName);
  ASSERT_TRUE(text.has_value());
  EXPECT_EQ(Sha256Hex(text->data(), text->size()),
            expected_["descriptor_sha256"].get<std::string>());
  EXPECT_EQ(ReadMetadata(bytes(), model_.size(), "other_entry"), "not the descriptor");
  EXPECT_FALSE(ReadMetadata(bytes(), model_.size(), "absent").has_value());
}

TEST_P(ModelDigestTest, ADamagedWeightChangesTheContentDigest) {
  std::string damaged = model_;
  size_t at = damaged.find("weights");
  ASSERT_NE(at, std::string::npos);
  damaged[at] = 'W';
  EXPECT_NE(ContentDigest(reinterpret_cast<const uint8_t*>(damaged.data()), damaged.size()),
            expected_["content_digest"].get<std::string>());
}

TEST_P(ModelDigestTest, CorruptedBytesAreAModelFileErrorNeverACrash) {
  // Truncations and byte flips: every outcome is a digest or an Error kModelFile.
  for (size_t n : {size_t(0), size_t(3), size_t(7), size_t(40), model_.size() / 2}) {
    try {
      ContentDigest(bytes(), n);
    } catch (const Error& e) {
      EXPECT_EQ(e.code(), Error::Code::kModelFile);
    }
  }
  int errors = 0;
  for (size_t i = 0; i < 64; ++i) {
    std::string flipped = model_;
    flipped[i] = char(flipped[i] ^ 0xff);
    try {
      ContentDigest(reinterpret_cast<const uint8_t*>(flipped.data()), flipped.size());
      CheckDigest(reinterpret_cast<const uint8_t*>(flipped.data()), flipped.size());
      ReadMetadata(reinterpret_cast<const uint8_t*>(flipped.data()), flipped.size(), "x");
    } catch (const Error& e) {
      EXPECT_EQ(e.code(), Error::Code::kModelFile);
      ++errors;
    }
  }
  EXPECT_GT(errors, 0);
  EXPECT_THROW(ContentDigest(nullptr, 0), Error);
}

INSTANTIATE_TEST_SUITE_P(Records, ModelDigestTest, ::testing::Values("buffers", "file"));

TEST(CheckDigestTest, AModelWithoutARecordIsAbsent) {
  const std::string model = ReadFile(DataPath("model_with_buffers_digest.bin"));
  std::string renamed = model;
  size_t at = renamed.find(kDigestName);
  ASSERT_NE(at, std::string::npos);
  renamed[at] = 'S';  // "Smtm_digest": no longer the record's name, and no file prefix.
  EXPECT_EQ(CheckDigest(reinterpret_cast<const uint8_t*>(renamed.data()), renamed.size()),
            DigestStatus::kAbsent);
}

}  // namespace
}  // namespace smtm
