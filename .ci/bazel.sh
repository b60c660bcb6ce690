#!/usr/bin/env bash
# Bazel, offline: installs Debian's Bazel 4.2.3 and the local repositories
# WORKSPACE points at, then runs every test target (the same tests pytest
# runs). Extra arguments go to `bazel test`, e.g. `bash .ci/bazel.sh
# //:test_descriptor`; the default is `//...`.
#
# Needs what the README's test command installs (python3 with smtm_tf's
# dependencies). Run after `source .ci/gpu_and_old_runtime.sh` (as .ci/run
# does), the GPU, old-runtime and QAT tests are mandatory, as under pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

export DEBIAN_FRONTEND=noninteractive
SUDO=""
if [ "$(id -u)" != "0" ]; then SUDO="sudo"; fi

# bazel-bootstrap: Bazel 4.2.3. bazel-bootstrap-source: its mock rules_cc
# (Debian's bazel-rules-cc is too new for 4.2.3). bazel-rules-java: rules_java.
# g++, nlohmann-json3-dev and libgtest-dev: native/core's cc targets.
# The third repository Bazel would download, remote_coverage_tools, is a stub
# in third_party/bazel/.
packages=(bazel-bootstrap bazel-bootstrap-source bazel-rules-java g++ nlohmann-json3-dev libgtest-dev)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' \
    || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  $SUDO apt-get update -q
  $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

if ! python3 -c "import tensorflow, keras, ai_edge_litert, absl.testing" 2>/dev/null; then
  echo "python3 ($(command -v python3)) lacks smtm_tf's dependencies; first run:" >&2
  echo "  python3 -m pip install -e '.[test]'" >&2
  exit 1
fi

# Under Bazel the tests run from their runfiles tree, where the checkout's
# .venv-tflite214 (delegates/old_runtime.py's default) is absent: name it.
if [ -z "${SMTM_OLD_RUNTIME_PYTHON:-}" ] && [ -x .venv-tflite214/bin/python ]; then
  export SMTM_OLD_RUNTIME_PYTHON="$PWD/.venv-tflite214/bin/python"
fi

if [ "$#" -eq 0 ]; then set -- //...; fi
bazel test "$@"
