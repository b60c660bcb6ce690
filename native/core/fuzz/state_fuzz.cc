// libFuzzer target: Memory::Load on arbitrary state files. Every input must
// load or throw smtm::Error kState, and a refused file leaves the memory as
// it was. The memory is that of the committed replay descriptor.
//
// Inputs starting with byte 0xA5 replace one member of the committed
// Python-written state (chosen by the next byte) with the rest of the input
// and re-pack the archive with correct CRCs, so mutations reach the .npy
// header parser and the range checks rather than stopping at the zip's CRC.
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <memory>
#include <sstream>
#include <string>

#include "npz.h"
#include "smtm/descriptor.h"
#include "smtm/error.h"
#include "smtm/memory.h"

namespace {

const smtm::Descriptor& Fixture() {
  static const smtm::Descriptor d = [] {
    std::ifstream f(SMTM_CORE_TESTDATA "/memory_trace_margin_share.json");
    std::ostringstream s;
    s << f.rdbuf();
    return smtm::Descriptor::Parse(s.str());
  }();
  return d;
}

}  // namespace

const std::string& GoodState() {
  static const std::string bytes = [] {
    std::ifstream f(SMTM_CORE_TESTDATA "/memory_trace_margin_share_state.npz", std::ios::binary);
    std::ostringstream s;
    s << f.rdbuf();
    return s.str();
  }();
  return bytes;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::string repacked;
  if (size >= 2 && data[0] == 0xA5) {
    auto members = smtm::internal::ReadNpz(GoodState());
    auto& member = members[data[1] % members.size()].second;
    try {
      member = smtm::internal::ReadNpy(std::string(reinterpret_cast<const char*>(data + 2), size - 2));
    } catch (const smtm::Error& e) {
      if (e.code() != smtm::Error::Code::kState) std::abort();
      return 0;
    }
    repacked = smtm::internal::WriteNpz(members);
    data = reinterpret_cast<const uint8_t*>(repacked.data());
    size = repacked.size();
  }
  static const std::string path = "/tmp/smtm_state_fuzz_" + std::to_string(getpid()) + ".npz";
  {
    std::ofstream out(path, std::ios::binary | std::ios::trunc);
    out.write(reinterpret_cast<const char*>(data), std::streamsize(size));
  }
  smtm::Memory m(Fixture());
  try {
    m.Load(path, "replay-fixture");
    // A loaded state must save again.
    m.Save(path, "replay-fixture");
  } catch (const smtm::Error& e) {
    if (e.code() != smtm::Error::Code::kState) std::abort();
    if (m.exits() != 0 || m.capacity() != Fixture().cache->min_hot) std::abort();
  }
  return 0;
}
