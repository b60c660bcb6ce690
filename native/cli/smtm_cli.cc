// smtm_cli: classify frames with the native SMTM runtime, or benchmark it.
//
//   smtm_cli classify --model=M.tflite --frames=F.npy [--state=S.npz] [--backend=cpu|gpu|gpu16]
//       prints "class_id exit_stage" per frame; with --state the memory is
//       restored from S.npz when valid and saved there at the end.
//   smtm_cli bench --model=M.tflite --frames=F.npy [--warmup=50] [--block=100]
//       runs the full model and SMTM interleaved in blocks (the method of
//       smtm_tf/evaluation/validation.py run_interleaved) and measures host
//       work per frame (validation.py host_work_us), and host work timed
//       directly (host_self_us: classify minus LiteRT's own run time).
//   --exit_rule=R.json (both commands) switches to another exit rule and cache
//       policy first: {"exit_rule": {...}, "cache": {...} or null}, as the
//       descriptor writes them (Runtime::SetExitRule).
//   --litert_logs=1 keeps LiteRT's own notes on stderr (hidden by default:
//   the command prints its results and its own errors only).
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <iterator>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include <fcntl.h>
#include <unistd.h>

#include "npy.h"
#include "runtime.h"

namespace {

using smtm::Error;
using Clock = std::chrono::steady_clock;

// LiteRT's GPU set-up prints notes on stdout; while the runtime is created
// stdout goes to stderr so that stdout holds only the decisions.
class StdoutToStderr {
 public:
  StdoutToStderr() : saved_(dup(1)) {
    std::fflush(stdout);
    if (saved_ >= 0) dup2(2, 1);
  }
  ~StdoutToStderr() {
    std::fflush(stdout);
    if (saved_ >= 0) {
      dup2(saved_, 1);
      close(saved_);
    }
  }

 private:
  int saved_;
};

// LiteRT writes its notes (environment, accelerators, delegates) to stderr
// with no way to turn them off through its C API. The command's own messages
// go to a copy of stderr taken first; unless --litert_logs=1, file descriptor
// 2 then points to /dev/null for the rest of the run.
FILE* err = stderr;

void HideLibraryLogs() {
  std::fflush(stderr);
  int saved = dup(2);
  int null = open("/dev/null", O_WRONLY);
  if (saved < 0 || null < 0) return;  // Nothing hidden: the logs stay visible.
  FILE* own = fdopen(saved, "w");
  if (own == nullptr) return;
  setvbuf(own, nullptr, _IONBF, 0);  // As stderr: each message at once.
  dup2(null, 2);
  close(null);
  err = own;
}

int Usage() {
  std::fprintf(err,
               "usage: smtm_cli classify --model=M.tflite --frames=F.npy [--state=S.npz] "
               "[--backend=cpu|gpu|gpu16] [--threads=N]\n"
               "       smtm_cli bench --model=M.tflite --frames=F.npy [--warmup=50] "
               "[--block=100] [--backend=...] [--threads=N]\n"
               "       --exit_rule=R.json switches to another exit rule and cache policy\n"
               "       --litert_logs=1 shows LiteRT's own notes on stderr\n");
  return 2;
}

std::vector<uint8_t> ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw Error(Error::Code::kIo, "Cannot open " + path + ".");
  return std::vector<uint8_t>((std::istreambuf_iterator<char>(in)),
                              std::istreambuf_iterator<char>());
}

int64_t Now() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             Clock::now().time_since_epoch()).count();
}

double Median(std::vector<int64_t> v) {
  std::sort(v.begin(), v.end());
  size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

// validation.py host_work_us: per frame, classify minus the bare runs of the
// signatures it ran, in two passes of opposite order; mean of the medians.
double HostWorkUs(smtm::Runtime& rt, const float* frames, size_t n, size_t size) {
  int stages = rt.num_stages();
  auto path = [&](int e) {
    for (int s = 0; s <= std::min(e, stages - 1); ++s) rt.RunStage(s);
    if (e >= stages) rt.RunHead();
  };
  rt.Reset();
  std::vector<int> exits;
  std::vector<int64_t> first, second;
  for (size_t i = 0; i < n; ++i) {
    int64_t t0 = Now();
    int e = rt.Classify(frames + i * size, size).exit_stage;
    int64_t t1 = Now();
    path(e);
    int64_t t2 = Now();
    exits.push_back(e);
    first.push_back((t1 - t0) - (t2 - t1));
  }
  rt.Reset();
  for (size_t i = 0; i < n; ++i) {
    int64_t t0 = Now();
    path(exits[i]);
    int64_t t1 = Now();
    rt.Classify(frames + i * size, size);
    int64_t t2 = Now();
    second.push_back((t2 - t1) - (t1 - t0));
  }
  rt.Reset();
  return (Median(first) + Median(second)) / 2e3;
}

// Host work timed directly: per frame, classify's time minus the time LiteRT
// spent in its runs (Runtime::model_ns); the median over `rounds` passes
// from an empty memory. Free of the weights' warmth that the difference of
// two ~1 ms runs carries; it counts one clock read per run (~20 ns) as host
// work.
double HostSelfUs(smtm::Runtime& rt, const float* frames, size_t n, size_t size, int rounds) {
  std::vector<int64_t> host;
  rt.set_timing(true);
  for (int r = 0; r < rounds; ++r) {
    rt.Reset();
    for (size_t i = 0; i < n; ++i) {
      const int64_t model0 = rt.model_ns();
      const int64_t t0 = Now();
      rt.Classify(frames + i * size, size);
      const int64_t t1 = Now();
      host.push_back((t1 - t0) - (rt.model_ns() - model0));
    }
  }
  rt.set_timing(false);
  rt.Reset();
  return Median(host) / 1e3;
}

int Bench(smtm::Runtime& rt, const float* frames, size_t n, size_t size, int warmup,
          int block) {
  if (block < 1) throw Error(Error::Code::kArgument, "--block must be >= 1.");
  struct Out { std::vector<int> pred, stage; std::vector<int64_t> ns; };
  std::map<std::string, Out> out;
  const char* keys[2] = {"full", "smtm"};
  auto run = [&](int k, size_t i, int* pred, int* stage) {
    if (k == 0) {
      *pred = rt.ClassifyFull(frames + i * size, size);
      *stage = rt.num_stages();
    } else {
      smtm::FrameResult r = rt.Classify(frames + i * size, size);
      *pred = r.class_id;
      *stage = r.exit_stage;
    }
  };
  for (int k = 0; k < 2; ++k) {
    Out& o = out[keys[k]];
    o.pred.resize(n);
    o.stage.resize(n);
    o.ns.resize(n);
    int p, s;
    for (size_t i = 0; i < std::min<size_t>(warmup, n); ++i) run(k, i, &p, &s);
    rt.Reset();  // Each stream starts with an empty memory.
  }
  for (size_t b = 0, start = 0; start < n; ++b, start += block) {
    size_t end = std::min(n, start + block);
    int order[2] = {static_cast<int>(b % 2), static_cast<int>((b + 1) % 2)};
    if ((b / 2) % 2) std::swap(order[0], order[1]);
    for (int k : order) {
      Out& o = out[keys[k]];
      for (size_t i = start; i < end; ++i) {
        int64_t t0 = Now();
        run(k, i, &o.pred[i], &o.stage[i]);
        o.ns[i] = Now() - t0;
      }
    }
  }
  auto mean_us = [&](const Out& o) {
    double sum = 0;
    for (int64_t v : o.ns) sum += v;
    return sum / n / 1e3;
  };
  double full_us = mean_us(out["full"]), smtm_us = mean_us(out["smtm"]);
  size_t agree = 0;
  std::vector<size_t> shares(rt.num_stages() + 1, 0);
  for (size_t i = 0; i < n; ++i) {
    agree += out["smtm"].pred[i] == out["full"].pred[i];
    shares[out["smtm"].stage[i]]++;
  }
  double host = HostWorkUs(rt, frames, n, size);
  double host_self = HostSelfUs(rt, frames, n, size, 3);
  std::printf("frames %zu\nfull_mean_us %.1f\nsmtm_mean_us %.1f\nspeedup %.3f\n"
              "host_work_us %.2f\nhost_self_us %.2f\nagreement_with_full %.4f\nexit_shares",
              n, full_us, smtm_us, full_us / smtm_us, host, host_self, double(agree) / n);
  for (size_t c : shares) std::printf(" %.3f", double(c) / n);
  std::printf("\n");
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) return Usage();
  std::string command = argv[1];
  std::map<std::string, std::string> flags;
  for (int i = 2; i < argc; ++i) {
    std::string a = argv[i];
    size_t eq = a.find('=');
    if (a.rfind("--", 0) != 0 || eq == std::string::npos) {
      std::fprintf(err, "Unknown argument %s (flags are --name=value).\n", a.c_str());
      return Usage();
    }
    flags[a.substr(2, eq - 2)] = a.substr(eq + 1);
  }
  for (const auto& [k, v] : flags) {
    static const char* known[] = {"model", "frames", "state", "backend", "threads", "warmup",
                                  "block", "exit_rule", "litert_logs"};
    if (std::none_of(std::begin(known), std::end(known), [&](const char* n) { return k == n; })) {
      std::fprintf(err, "Unknown flag --%s.\n", k.c_str());
      return Usage();
    }
  }
  if (flags.count("litert_logs") && flags["litert_logs"] != "0" && flags["litert_logs"] != "1") {
    std::fprintf(err, "--litert_logs must be 0 or 1, got %s.\n", flags["litert_logs"].c_str());
    return Usage();
  }
  if (flags["litert_logs"] != "1") HideLibraryLogs();
  if ((command != "classify" && command != "bench") || !flags.count("model") ||
      !flags.count("frames")) {
    return Usage();
  }
  try {
    smtm::RuntimeOptions options;
    std::string backend = flags.count("backend") ? flags["backend"] : "cpu";
    if (backend == "gpu") options.accelerator = smtm::litert::Accelerator::kGpuFp32;
    else if (backend == "gpu16") options.accelerator = smtm::litert::Accelerator::kGpuFp16;
    else if (backend != "cpu") {
      throw Error(Error::Code::kArgument, "--backend must be cpu, gpu or gpu16, got " + backend + ".");
    }
    if (flags.count("threads")) options.cpu_threads = std::stoi(flags["threads"]);
    std::vector<uint8_t> model = ReadFile(flags["model"]);
    std::unique_ptr<smtm::Runtime> owned;
    {
      StdoutToStderr quiet;
      owned = std::make_unique<smtm::Runtime>(model.data(), model.size(), options);
    }
    smtm::Runtime& rt = *owned;
    if (flags.count("exit_rule")) {
      std::vector<uint8_t> rule = ReadFile(flags["exit_rule"]);
      try {
        rt.SetExitRule(std::string_view(reinterpret_cast<const char*>(rule.data()), rule.size()));
      } catch (const Error& e) {
        throw Error(e.code(), flags["exit_rule"] + ": " + e.what());
      }
    }
    smtm::NpyArray frames = smtm::LoadNpy(flags["frames"]);
    size_t size = rt.frame_size();
    if (frames.shape.empty() || frames.size() % size != 0 ||
        frames.size() / frames.shape[0] != size) {
      throw Error(Error::Code::kArgument,
                  flags["frames"] + ": frames must be float32 [N, ...] with " +
                      std::to_string(size) + " values per frame.");
    }
    size_t n = frames.shape[0];
    const float* data = frames.f32();
    if (command == "bench") {
      int warmup = flags.count("warmup") ? std::stoi(flags["warmup"]) : 50;
      int block = flags.count("block") ? std::stoi(flags["block"]) : 100;
      return Bench(rt, data, n, size, warmup, block);
    }
    if (flags.count("state")) {
      std::string why;
      if (!rt.LoadState(flags["state"], &why)) {
        std::fprintf(err, "Ignoring the memory state %s (%s); starting with a fresh cache.\n",
                     flags["state"].c_str(), why.c_str());
      }
    }
    for (size_t i = 0; i < n; ++i) {
      smtm::FrameResult r = rt.Classify(data + i * size, size);
      std::printf("%d %d\n", r.class_id, r.exit_stage);
    }
    if (flags.count("state")) rt.SaveState(flags["state"]);
  } catch (const Error& e) {
    std::fprintf(err, "smtm_cli: %s\n", e.what());
    return 1;
  } catch (const std::exception& e) {
    std::fprintf(err, "smtm_cli: %s\n", e.what());
    return 1;
  }
  return 0;
}
