#!/usr/bin/env bash
# Sourced by .ci/run: provides Mesa's software Vulkan driver (the GPU path on
# machines without a GPU), a tflite-runtime 2.14 virtualenv (older app
# runtimes) and tensorflow-model-optimization (QAT). Each one that cannot be
# provided is announced with a visible SKIP line; each one that is provided
# makes its tests mandatory (SMTM_REQUIRE_*=1: they fail instead of skipping).

_ci_skip() { echo "==================== SKIP: $* ====================" >&2; }

# Mesa >= 25 lavapipe: Debian 12's Mesa 22.3 has no adapter the WebGPU
# accelerator accepts, so it comes from bookworm-backports.
_lvp_ok() {
  ls /usr/share/vulkan/icd.d/lvp_icd*.json >/dev/null 2>&1 || return 1
  local v
  v=$(dpkg-query -W -f='${Version}' mesa-vulkan-drivers 2>/dev/null || echo 0)
  dpkg --compare-versions "$v" ge 25 2>/dev/null
}
if ! _lvp_ok; then
  codename=$(. /etc/os-release 2>/dev/null && echo "${VERSION_CODENAME:-}")
  if [ "$codename" = "bookworm" ]; then
    if [ ! -f /etc/apt/sources.list.d/bookworm-backports.sources ] && \
       ! grep -rqs "bookworm-backports" /etc/apt/sources.list /etc/apt/sources.list.d/; then
      printf 'Types: deb\nURIs: http://deb.debian.org/debian\nSuites: bookworm-backports\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
        | $SUDO tee /etc/apt/sources.list.d/bookworm-backports.sources >/dev/null || true
    fi
    { $SUDO apt-get update -q && \
      $SUDO apt-get install -y -q --no-install-recommends -t bookworm-backports \
        mesa-vulkan-drivers libvulkan1; } || true
  else
    { $SUDO apt-get update -q && \
      $SUDO apt-get install -y -q --no-install-recommends mesa-vulkan-drivers libvulkan1; } || true
  fi
fi
export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-$(mktemp -d)}"
if _lvp_ok; then
  export SMTM_REQUIRE_GPU=1
else
  _ci_skip "no Mesa >= 25 software Vulkan driver could be installed: GPU tests skip, no strict-GPU check"
fi

# tflite-runtime 2.14.0 (wheels for CPython 3.8-3.11) needs numpy<2: own venv.
if [ ! -x .venv-tflite214/bin/python ] || ! .venv-tflite214/bin/python -c "import tflite_runtime" 2>/dev/null; then
  { python3 -m venv .venv-tflite214 && \
    .venv-tflite214/bin/pip install -q 'numpy<2' tflite-runtime==2.14.0; } || rm -rf .venv-tflite214
fi
if [ -x .venv-tflite214/bin/python ]; then
  export SMTM_REQUIRE_OLD_RUNTIME=1
else
  _ci_skip "tflite-runtime==2.14.0 cannot be installed for $(python3 --version): old-runtime tests skip"
fi

# QAT: tfmot with --no-deps (its absl-py~=1.2 pin conflicts; see pyproject.toml).
if python3 -m pip install -q -e '.[qat]' && \
   python3 -m pip install -q --no-deps tensorflow-model-optimization==0.8.1; then
  export SMTM_REQUIRE_QAT=1
else
  _ci_skip "tensorflow-model-optimization could not be installed: the QAT test skips"
fi
