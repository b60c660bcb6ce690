#!/usr/bin/env bash
# CI: the native runtime (native/). Installs its Debian packages, builds it with
# AddressSanitizer + UndefinedBehaviorSanitizer, exports the golden traces with
# the Python runtime and replays them natively (GoogleTest and JUnit 5), runs
# the Python <-> native state file round trip, and fuzzes the core's parsers
# for a bounded time.
#   bash .ci/native.sh            (FUZZ_SECONDS=30 per target by default)
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(g++ clang cmake nlohmann-json3-dev libgtest-dev openjdk-17-jdk-headless junit5)
missing=()
for p in "${packages[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  SUDO=""
  if [ "$(id -u)" != "0" ]; then SUDO="sudo"; fi
  $SUDO apt-get update -q
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}"
fi

build=native/build-ci
cmake -S native -B "$build" -DSMTM_SANITIZE=ON -DCMAKE_BUILD_TYPE=RelWithDebInfo
cmake --build "$build" -j"$(nproc)"

# Golden traces: the demo models converted with their committed memories, the
# stream frames and the committed decisions (the script refuses to export if
# the Python runtime no longer makes them).
export SMTM_GOLDEN_DIR="${SMTM_GOLDEN_DIR:-$PWD/$build/golden}"
python3 scripts/golden_traces.py --export_dir="$SMTM_GOLDEN_DIR"

# libLiteRt.so is not built with the sanitizers: LiteRT keeps its accelerator
# registry and XNNPACK caches in globals it never frees, which LeakSanitizer
# reports as leaks at exit, so leak checking is off; every other ASan/UBSan
# check stays on and aborts the test.
export ASAN_OPTIONS=detect_leaks=0
# The GPU test runs where LiteRT's WebGPU accelerator finds a Vulkan driver
# (Mesa >= 25's lavapipe works); Dawn wants a runtime directory.
export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-$(mktemp -d)}"
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
ctest --test-dir "$build" --output-on-failure

# Fuzzers (libFuzzer needs clang), with ASan+UBSan so an out-of-bounds read
# that does not crash is still caught: the core's parsers, bounded time per
# target, seeded with the committed fixtures (descriptors, state files, models).
fuzz_build=native/build-fuzz
if ls native/core/fuzz/*.cc >/dev/null 2>&1; then
  CC=clang CXX=clang++ cmake -S native/core -B "$fuzz_build" -DCMAKE_BUILD_TYPE=RelWithDebInfo \
    -DSMTM_CORE_FUZZ=ON -DSMTM_CORE_TESTS=OFF -DSMTM_SANITIZE=ON
  cmake --build "$fuzz_build" -j"$(nproc)"
  found=0
  for f in "$fuzz_build"/*fuzz*; do
    [ -x "$f" ] && [ -f "$f" ] || continue
    found=1
    corpus="$fuzz_build/corpus/$(basename "$f")"
    mkdir -p "$corpus"
    cp native/core/tests/data/* "$corpus"/
    echo "fuzzing $(basename "$f") for ${FUZZ_SECONDS:-30} s"
    "$f" -max_total_time="${FUZZ_SECONDS:-30}" -print_final_stats=1 "$corpus"
  done
  [ "$found" = 1 ] || { echo "no fuzz targets were built in $fuzz_build"; exit 1; }
fi
echo "native CI passed"
