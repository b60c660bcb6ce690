// libFuzzer target: Descriptor::Parse and RuleChoice::Parse on arbitrary
// bytes. Every input must parse or throw smtm::Error (kModelFile for a
// descriptor, kArgument for a rule choice); anything else (a crash, another
// exception, a sanitizer report) is a bug. A parsed descriptor must also
// build a Memory and run a lookup without fault.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string_view>
#include <vector>

#include "smtm/descriptor.h"
#include "smtm/error.h"
#include "smtm/memory.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  // The same bytes as an exit rule choice (smtm_set_exit_rule): it parses or
  // throws kArgument.
  try {
    smtm::RuleChoice::Parse(std::string_view(reinterpret_cast<const char*>(data), size));
  } catch (const smtm::Error& e) {
    if (e.code() != smtm::Error::Code::kArgument) std::abort();
  }
  smtm::Descriptor d;
  try {
    d = smtm::Descriptor::Parse(std::string_view(reinterpret_cast<const char*>(data), size));
  } catch (const smtm::Error& e) {
    if (e.code() != smtm::Error::Code::kModelFile) std::abort();
    return 0;
  }
  try {
    smtm::Memory m(d);
    if (size_t(d.num_classes()) * size_t(d.embedding_dim()) > (1u << 20)) return 0;
    std::vector<float> sims(size_t(d.num_classes()), 0.5f), sem(size_t(d.embedding_dim()), 0.1f);
    std::vector<const float*> sems(size_t(d.num_stages()), sem.data());
    for (int s = 0; s < d.num_stages(); ++s) m.Decide(s, sims.data(), sem.data());
    m.Record(0, true, sems.data(), d.num_stages(), 1.0);
  } catch (const smtm::Error& e) {
    // Stages of different embedding sizes: the runtime refuses the model.
    if (e.code() != smtm::Error::Code::kModelFile) std::abort();
  }
  return 0;
}
