// Replays the memory traces Python's MemoryState made
// (make_memory_trace.py) and requires identical decisions and state.
#include <cmath>
#include <cstdio>
#include <cstring>

#include <gtest/gtest.h>

#include "smtm/descriptor.h"
#include "smtm/digest.h"
#include "smtm/error.h"
#include "smtm/memory.h"
#include "test_util.h"

namespace smtm {
namespace {

using testing::DataPath;
using testing::ReadArrays;
using testing::ReadFile;
using testing::TempPath;
using testing::Values;

constexpr const char* kFingerprint = "replay-fixture";

class ReplayTest : public ::testing::TestWithParam<const char*> {};

TEST_P(ReplayTest, MakesPythonsDecisions) {
  const std::string base = DataPath(std::string("memory_trace_") + GetParam());
  const Descriptor d = Descriptor::Parse(ReadFile(base + ".json"));
  auto arrays = ReadArrays(base + ".npz");
  const int S = d.num_stages(), K = d.num_classes(), D = d.embedding_dim();
  const auto sims = Values<float>(arrays["sims"], "<f4");
  const auto sems = Values<float>(arrays["sems"], "<f4");
  const auto head = Values<int64_t>(arrays["head"], "<i8");
  const auto full = Values<int64_t>(arrays["full"], "<i8");
  const auto conf = Values<double>(arrays["conf"], "<f8");
  const auto exit_stage = Values<int64_t>(arrays["exit_stage"], "<i8");
  const auto answer = Values<int64_t>(arrays["answer"], "<i8");
  const auto top1 = Values<int64_t>(arrays["top1"], "<i8");
  const auto value = Values<double>(arrays["value"], "<f8");
  const auto favoured = Values<uint8_t>(arrays["favoured"], "|b1");
  const auto hot = Values<uint8_t>(arrays["hot"], "|b1");
  const auto scores = Values<double>(arrays["scores"], "<f8");
  const auto shift = Values<float>(arrays["shift"], "<f4");
  const auto capacity = Values<int64_t>(arrays["capacity"], "<i8");
  const auto counters = Values<int64_t>(arrays["counters"], "<i8");
  const auto centres_sha = Values<uint8_t>(arrays["centres_sha"], "|u1");
  const int frames = int(head.size());
  ASSERT_GT(frames, 100);

  auto memory = std::make_unique<Memory>(d);
  const std::string mid_state = TempPath(std::string(GetParam()) + "_mid.npz");
  int exits = 0, matches = 0;
  for (int f = 0; f < frames; ++f) {
    if (f == frames / 2) {
      // Save, restore into a fresh memory and go on with that one.
      memory->Save(mid_state, kFingerprint);
      auto restored = std::make_unique<Memory>(d);
      restored->Load(mid_state, kFingerprint);
      memory = std::move(restored);
      std::remove(mid_state.c_str());
    }
    std::vector<const float*> semantics(static_cast<size_t>(S));
    for (int s = 0; s < S; ++s) semantics[size_t(s)] = &sems[(size_t(f) * S + s) * D];
    int got_answer = -1, got_stage = S;
    for (int s = 0; s < S; ++s) {
      if (memory->Never(s)) continue;
      const float* x = &sims[(size_t(f) * S + s) * K];
      const Lookup l = memory->LookupStage(s, x, semantics[size_t(s)]);
      const size_t at = size_t(f) * S + s;
      ASSERT_EQ(l.top1, top1[at]) << "frame " << f << " stage " << s;
      ASSERT_EQ(l.value, value[at]) << "frame " << f << " stage " << s;
      ASSERT_EQ(l.favoured, favoured[at] != 0) << "frame " << f << " stage " << s;
      if (l.favoured && !memory->Hot(l.top1)) ++matches;
      int ans = memory->Decide(s, x, semantics[size_t(s)]);
      if (ans >= 0) {
        bool confirmed = false;
        if (memory->VerifyDue()) {
          memory->Verified(ans, int(full[size_t(f)]));
          if (full[size_t(f)] != ans) {
            ans = int(full[size_t(f)]);
            confirmed = true;
          }
        }
        memory->Record(ans, confirmed, semantics.data(), s + 1, confirmed ? conf[size_t(f)] : 1.0);
        got_answer = ans;
        got_stage = s;
        ++exits;
        break;
      }
    }
    if (got_answer < 0) {
      got_answer = int(head[size_t(f)]);
      memory->Record(got_answer, true, semantics.data(), S, conf[size_t(f)]);
    }
    ASSERT_EQ(got_stage, exit_stage[size_t(f)]) << "frame " << f;
    ASSERT_EQ(got_answer, answer[size_t(f)]) << "frame " << f;
    for (int c = 0; c < K; ++c) {
      const size_t at = size_t(f) * K + c;
      ASSERT_EQ(memory->Hot(c), hot[at] != 0) << "frame " << f << " class " << c;
      ASSERT_EQ(memory->scores()[size_t(c)], scores[at]) << "frame " << f << " class " << c;
      ASSERT_EQ(memory->shift()[size_t(c)], shift[at]) << "frame " << f << " class " << c;
    }
    ASSERT_EQ(memory->capacity(), capacity[size_t(f)]) << "frame " << f;
    const int64_t want[6] = {memory->exits(), memory->checks(), memory->disagreements(),
                             memory->reverts(), memory->exit_run(), memory->last_hit()};
    for (int i = 0; i < 6; ++i) ASSERT_EQ(want[i], counters[size_t(f) * 6 + i]) << "frame " << f;
    std::string sha = Sha256Hex(memory->Centres(0), size_t(S) * K * D * sizeof(float));
    char hex[65];
    for (int i = 0; i < 32; ++i) std::snprintf(hex + 2 * i, 3, "%02x", centres_sha[size_t(f) * 32 + i]);
    ASSERT_EQ(sha, std::string(hex, 64)) << "centres differ after frame " << f;
  }
  EXPECT_GT(exits, frames / 4);
  std::printf("[ replay   ] %s: %d frames, %d early exits, %d favoured by the short-term tier, "
              "%lld checks, %lld reverts\n", GetParam(), frames, exits, matches,
              (long long)memory->checks(), (long long)memory->reverts());

  // The final state file is byte for byte what Python's save_state wrote.
  const std::string out = TempPath(std::string(GetParam()) + "_final.npz");
  memory->Save(out, kFingerprint);
  EXPECT_EQ(ReadFile(out), ReadFile(base + "_state.npz"));
  std::remove(out.c_str());

  // And Python's state file restores the same memory.
  Memory restored(d);
  restored.Load(base + "_state.npz", kFingerprint);
  EXPECT_EQ(restored.scores(), memory->scores());
  EXPECT_EQ(restored.capacity(), memory->capacity());
  EXPECT_EQ(restored.exits(), memory->exits());
  for (int c = 0; c < K; ++c) EXPECT_EQ(restored.Hot(c), memory->Hot(c));
  EXPECT_EQ(0, std::memcmp(restored.Centres(0), memory->Centres(0), size_t(S) * K * D * 4));
  EXPECT_THROW(restored.Load(base + "_state.npz", "another model"), Error);
}

INSTANTIATE_TEST_SUITE_P(Traces, ReplayTest,
                         ::testing::Values("margin_share", "layer_aware_contrast", "top1_nocache"));

}  // namespace
}  // namespace smtm
