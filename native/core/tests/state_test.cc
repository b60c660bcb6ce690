// Memory::Save / Memory::Load range checks (MemoryState.to_arrays /
// from_arrays): state files edited array by array, then loaded.
#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "npz.h"
#include "smtm/descriptor.h"
#include "smtm/error.h"
#include "smtm/memory.h"
#include "test_util.h"

namespace smtm {
namespace {

using internal::NpyArray;
using internal::NpzMembers;
using testing::DataPath;
using testing::ReadFile;
using testing::TempPath;

constexpr const char* kFingerprint = "state-test";

class StateTest : public ::testing::Test {
 protected:
  void SetUp() override {
    // Three stages, 10 classes, 16 dims, 3 instance slots, adaptation on.
    descriptor_ = Descriptor::Parse(ReadFile(DataPath("memory_trace_margin_share.json")));
    path_ = TempPath(std::string(::testing::UnitTest::GetInstance()->current_test_info()->name()) +
                     ".npz");
  }
  void TearDown() override { std::remove(path_.c_str()); }

  // A fresh memory's state file, as its arrays in the archive's order.
  NpzMembers Saved() {
    Memory(descriptor_).Save(path_, kFingerprint);
    return internal::ReadNpz(ReadFile(path_));
  }
  static NpyArray& Get(NpzMembers& members, const std::string& name) {
    for (auto& [n, a] : members) {
      if (n == "state_" + name) return a;
    }
    throw std::runtime_error("no state array " + name);
  }
  template <typename T>
  static void Set(NpyArray& a, const char* descr, const std::vector<T>& values) {
    a.descr = descr;
    a.data.assign(reinterpret_cast<const char*>(values.data()), values.size() * sizeof(T));
  }
  // Writes the members, loads them into a fresh memory; "" when it loads,
  // else the error's message.
  std::string LoadError(const NpzMembers& members) {
    std::FILE* f = std::fopen(path_.c_str(), "wb");
    const std::string bytes = internal::WriteNpz(members);
    EXPECT_EQ(std::fwrite(bytes.data(), 1, bytes.size(), f), bytes.size());
    std::fclose(f);
    Memory memory(descriptor_);
    try {
      memory.Load(path_, kFingerprint);
    } catch (const Error& e) {
      EXPECT_EQ(e.code(), Error::Code::kState);
      return e.what();
    }
    return "";
  }
  size_t InstSize() const {
    return size_t(descriptor_.num_stages()) * 3 * size_t(descriptor_.embedding_dim());
  }
  size_t OffsetsSize() const {
    return size_t(descriptor_.num_stages()) * size_t(descriptor_.num_classes()) *
           size_t(descriptor_.embedding_dim());
  }

  Descriptor descriptor_;
  std::string path_;
};

TEST_F(StateTest, FreshStateLoads) { EXPECT_EQ(LoadError(Saved()), ""); }

TEST_F(StateTest, FinitenessCheckedInTheInMemoryDtype) {
  // 1e300 is finite as float64 and infinite once cast to the float32 tier or offsets.
  for (const char* name : {"inst", "offsets"}) {
    NpzMembers m = Saved();
    std::vector<double> values(name == std::string("inst") ? InstSize() : OffsetsSize(), 0.0);
    values[5] = 1e300;
    Set(Get(m, name), "<f8", values);
    EXPECT_EQ(LoadError(m),
              std::string("state array '") + name + "' holds non-finite values (as float32).");
  }
  // The scores are held in float64: 1e300 passes the finiteness check and
  // fails the range check.
  NpzMembers m = Saved();
  std::vector<double> scores(size_t(descriptor_.num_classes()), 0.0);
  scores[2] = 1e300;
  Set(Get(m, "scores"), "<f8", scores);
  EXPECT_NE(LoadError(m).find("class scores must be in [0, "), std::string::npos);
  scores[2] = INFINITY;
  Set(Get(m, "scores"), "<f8", scores);
  EXPECT_EQ(LoadError(m), "state array 'scores' holds non-finite values (as float64).");
}

TEST_F(StateTest, ShortTermTierRowsMustBeUnitOrShorter) {
  const size_t D = size_t(descriptor_.embedding_dim());
  // A row of the last stage's last slot, beyond the tier's count: every row is checked.
  const size_t row = InstSize() - D;
  for (const auto& [norm, loads] : std::vector<std::pair<float, bool>>{
           {1.0f, true}, {1.00005f, true}, {0.5f, true}, {1.001f, false}, {2.0f, false}}) {
    NpzMembers m = Saved();
    std::vector<float> inst(InstSize(), 0.0f);
    for (size_t i = 0; i < D; ++i) inst[row + i] = norm / std::sqrt(float(D));
    Set(Get(m, "inst"), "<f4", inst);
    EXPECT_EQ(LoadError(m), loads ? "" : "the short-term tier holds vectors longer than 1.")
        << "norm " << norm;
  }
  // A finite float32 value whose square overflows is refused too.
  NpzMembers m = Saved();
  std::vector<float> inst(InstSize(), 0.0f);
  inst[3] = 1e20f;
  Set(Get(m, "inst"), "<f4", inst);
  EXPECT_EQ(LoadError(m), "the short-term tier holds vectors longer than 1.");
}

TEST_F(StateTest, CountersSavedSaturatedAtTheLoadBound) {
  NpzMembers m = Saved();
  Set(Get(m, "counters"), "<i8", std::vector<int64_t>(5, kMaxCount));
  ASSERT_EQ(LoadError(m), "");
  Set(Get(m, "counters"), "<i8", std::vector<int64_t>(5, kMaxCount + 1));
  EXPECT_EQ(LoadError(m), "exit counters must be <= " + std::to_string(kMaxCount) + ".");

  // Restored at the bound and run on, a memory still saves a state that restores.
  Set(Get(m, "counters"), "<i8", std::vector<int64_t>(5, kMaxCount));
  ASSERT_EQ(LoadError(m), "");
  Memory memory(descriptor_);
  memory.Load(path_, kFingerprint);
  memory.VerifyDue();  // Counts an exit: exits and exit_run go past the bound.
  ASSERT_EQ(memory.exits(), kMaxCount + 1);
  ASSERT_EQ(memory.exit_run(), kMaxCount + 1);
  memory.Save(path_, kFingerprint);
  const auto saved = testing::Values<int64_t>(testing::ReadArrays(path_)["state_counters"], "<i8");
  EXPECT_EQ(saved, std::vector<int64_t>(5, kMaxCount));
  Memory restored(descriptor_);
  restored.Load(path_, kFingerprint);
  EXPECT_EQ(restored.exits(), kMaxCount);
  EXPECT_EQ(restored.exit_run(), kMaxCount);
}

}  // namespace
}  // namespace smtm
