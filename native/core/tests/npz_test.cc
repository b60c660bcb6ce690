#include <cstdio>
#include <fstream>

#include <gtest/gtest.h>

#include "npz.h"
#include "smtm/descriptor.h"
#include "smtm/error.h"
#include "smtm/memory.h"
#include "test_util.h"

namespace smtm {
namespace {

using testing::DataPath;
using testing::ReadFile;
using testing::TempPath;

const char* kFixture = "memory_trace_margin_share";

Descriptor Fixture() { return Descriptor::Parse(ReadFile(DataPath(std::string(kFixture) + ".json"))); }

TEST(NpzTest, ReadsWhatNumpyWroteAndWritesItBack) {
  const std::string bytes = ReadFile(DataPath(std::string(kFixture) + "_state.npz"));
  auto members = internal::ReadNpz(bytes);
  ASSERT_EQ(members.size(), 13u);
  EXPECT_EQ(members[0].first, "state_scores");
  EXPECT_EQ(members[8].first, "state_inst_pos");
  EXPECT_TRUE(members[8].second.fortran_order);  // np.array([count, next]).T
  EXPECT_EQ(members[12].first, "meta");
  EXPECT_EQ(internal::WriteNpz(members), bytes);
}

class StateFileTest : public ::testing::Test {
 protected:
  void SetUp() override { path_ = TempPath("state.npz"); }
  void TearDown() override { std::remove(path_.c_str()); }
  std::string path_;
};

TEST_F(StateFileTest, RoundTripsAndChecksTheFingerprint) {
  const Descriptor d = Fixture();
  Memory a(d);
  std::vector<float> sem(size_t(d.num_stages()) * d.embedding_dim(), 0.0f);
  std::vector<const float*> sems;
  for (int s = 0; s < d.num_stages(); ++s) sems.push_back(&sem[size_t(s) * d.embedding_dim()]);
  for (int i = 0; i < 12; ++i) a.Record(i % 3, i % 2 == 0, sems.data(), d.num_stages(), 0.95);
  a.Save(path_, "fp");
  Memory b(d);
  b.Load(path_, "fp");
  EXPECT_EQ(b.scores(), a.scores());
  EXPECT_EQ(b.capacity(), a.capacity());
  try {
    b.Load(path_, "other");
    FAIL();
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), Error::Code::kState);
    EXPECT_NE(std::string(e.what()).find("another model"), std::string::npos);
  }
}

TEST_F(StateFileTest, RefusesDamagedOrForeignFilesLeavingTheMemoryAsItWas) {
  const Descriptor d = Fixture();
  Memory m(d);
  EXPECT_THROW(m.Load(path_ + ".absent", "fp"), Error);
  const std::string good = ReadFile(DataPath(std::string(kFixture) + "_state.npz"));
  auto write = [&](const std::string& bytes) {
    std::ofstream(path_, std::ios::binary) << bytes;
  };
  // Every truncation and a flipped byte in each region fail cleanly.
  for (size_t n = 0; n < good.size(); n += 97) {
    write(good.substr(0, n));
    EXPECT_THROW(m.Load(path_, "replay-fixture"), Error) << n;
  }
  for (size_t i = 0; i < good.size(); i += 61) {
    std::string bad = good;
    bad[i] = char(bad[i] ^ 0x5a);
    write(bad);
    try {
      m.Load(path_, "replay-fixture");
    } catch (const Error& e) {
      EXPECT_EQ(e.code(), Error::Code::kState);
    }
  }
  // A flip the file format does not guard (a zip header's date) may load.
  m.Reset();
  // Out-of-range values, as from_arrays refuses them.
  auto members = internal::ReadNpz(good);
  auto edit = [&](const std::string& name, auto fn) {
    auto copy = members;
    for (auto& [k, v] : copy) {
      if (k == name) fn(v);
    }
    write(internal::WriteNpz(copy));
    try {
      m.Load(path_, "replay-fixture");
      return std::string("accepted");
    } catch (const Error& e) {
      EXPECT_EQ(e.code(), Error::Code::kState);
      return std::string(e.what());
    }
  };
  EXPECT_NE(edit("state_scores", [](internal::NpyArray& a) {
              double big = 11.0;
              std::memcpy(a.data.data(), &big, 8);
            }).find("class scores must be in [0, 10]"), std::string::npos);
  EXPECT_NE(edit("state_capacity", [](internal::NpyArray& a) {
              int64_t v = 99;
              std::memcpy(a.data.data(), &v, 8);
            }).find("capacity 99 is outside [1, 4]"), std::string::npos);
  EXPECT_NE(edit("state_hot", [](internal::NpyArray& a) { a.shape = {9}; a.data.pop_back(); })
                .find("state array 'hot' has shape (9,), this model needs (10,)."),
            std::string::npos);
  EXPECT_NE(edit("state_offsets", [](internal::NpyArray& a) {
              float v = 1.0f;
              std::memcpy(a.data.data(), &v, 4);
            }).find("further than max_drift"), std::string::npos);
  EXPECT_NE(edit("state_inst_pos", [](internal::NpyArray& a) {
              int64_t v = 7;
              std::memcpy(a.data.data(), &v, 8);
            }).find("short-term tier"), std::string::npos);
  EXPECT_NE(edit("meta", [](internal::NpyArray& a) { a.data[4 * 19] = '9'; }).find("state format"),
            std::string::npos);
  // The memory is still the fresh one.
  EXPECT_EQ(m.exits(), 0);
  EXPECT_EQ(m.scores(), std::vector<double>(10, 0.0));
}

TEST_F(StateFileTest, SaveIsAtomicAndReportsUnwritablePaths) {
  const Descriptor d = Fixture();
  Memory m(d);
  try {
    m.Save("/proc/smtm_no_such_dir/state.npz", "fp");
    FAIL();
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), Error::Code::kIo);
  }
  m.Save(path_, "fp");
  m.Save(path_, "fp");  // Replaces the file.
  Memory n(d);
  n.Load(path_, "fp");
}

}  // namespace
}  // namespace smtm
