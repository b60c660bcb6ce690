"""Checks a backend's outputs against the CPU backend, signature by signature.

A GPU kernel can compute the wrong thing without any error (the platform's
CUMSUM on the last axis did), so a backend is trusted only after its outputs
on real inputs match the CPU interpreter's within stated tolerances, and its
exit decisions on a stream match the CPU's.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from delegates import cpu
from smtm_tf.runtime import SmtmRuntime
from smtm_tf.runtime import read_descriptor


@dataclasses.dataclass(frozen=True)
class Tolerance:
    """|got - want| <= atol + rtol * max|want| (per output, over all samples)."""

    atol: float
    rtol: float = 0.0

    def limit(self, scale: float) -> float:
        return self.atol + self.rtol * scale


# Stated tolerances. fp32 GPU kernels differ from XNNPACK only in summation
# order. fp16 kernels round every intermediate to 11 significant bits: on the
# demo model unit-vector similarities moved by up to 1.1e-2, probabilities by
# 1.8e-3 and activations by up to 5e-2 (<= 40% of the limit below), measured
# on lavapipe (docs/gpu_and_quantization.md).
TOLERANCES = {
    "fp32": {"similarities": Tolerance(1e-5), "semantic": Tolerance(1e-5),
             "probabilities": Tolerance(1e-5), "next_activation": Tolerance(1e-5, 1e-5)},
    "fp16": {"similarities": Tolerance(3e-2), "semantic": Tolerance(3e-2),
             "probabilities": Tolerance(1e-2), "next_activation": Tolerance(1e-2, 2e-2)},
}


@dataclasses.dataclass(frozen=True)
class OutputAgreement:
    signature: str
    output: str
    max_abs_diff: float
    scale: float  # max |want|
    limit: float

    @property
    def ok(self) -> bool:
        return bool(self.max_abs_diff <= self.limit)  # NaN fails.


@dataclasses.dataclass(frozen=True)
class AgreementReport:
    precision: str
    num_samples: int
    outputs: tuple[OutputAgreement, ...]

    @property
    def ok(self) -> bool:
        return all(o.ok for o in self.outputs)

    @property
    def failures(self) -> tuple[OutputAgreement, ...]:
        return tuple(o for o in self.outputs if not o.ok)

    def max_diff(self, output: str) -> float:
        return max((o.max_abs_diff for o in self.outputs if o.output == output), default=0.0)

    def format(self) -> str:
        lines = [f"{'signature':<10} {'output':<16} {'max |diff|':>11} {'limit':>9}  ok"]
        for o in self.outputs:
            lines.append(f"{o.signature:<10} {o.output:<16} {o.max_abs_diff:>11.2e} "
                         f"{o.limit:>9.1e}  {'yes' if o.ok else 'NO'}")
        return "\n".join(lines)


class AgreementError(RuntimeError):
    """A backend's outputs differ from the CPU's beyond the stated tolerance."""


def compare_with_cpu(model_content: bytes, backend, images: np.ndarray,
                     precision: str = "fp32", reference=None,
                     tolerances: dict[str, Tolerance] | None = None) -> AgreementReport:
    """Runs every signature on `backend` and on the CPU with the same inputs.

    Each stage gets the CPU's activation of the previous stage (so errors do
    not compound across stages) and the descriptor's centres; the head gets
    the CPU's last activation, `full` the image.

    Args:
      model_content: an SMTM .tflite.
      backend: the backend under test (anything with `load(bytes)`).
      images: sample frames `[N, H, W, C]`.
      precision: "fp32" or "fp16": which stated tolerances apply.
      reference: the reference backend (default: CPU, XNNPACK, 1 thread).
      tolerances: output name -> Tolerance, overriding the stated ones.

    Returns:
      The report (`report.ok` says whether all outputs agree).
    """

    descriptor = read_descriptor(model_content)
    tol = dict(TOLERANCES[precision])
    tol.update(tolerances or {})
    ref = (reference or cpu.CpuBackend(num_threads=1)).load(model_content)
    test = backend.load(model_content)
    diffs: dict[tuple[str, str], list[float]] = {}

    def run(key: str, **inputs):
        want = ref.signature(key)(**inputs)
        got = test.signature(key)(**inputs)
        for name, w in want.items():
            d = float(np.max(np.abs(np.asarray(got[name], np.float64) - w)))
            if np.isnan(d) or not np.all(np.isfinite(got[name])):
                d = float("nan")
            prev = diffs.setdefault((key, name), [0.0, 0.0])
            prev[0] = d if np.isnan(d) or np.isnan(prev[0]) else max(prev[0], d)
            prev[1] = max(prev[1], float(np.max(np.abs(w))))
        return want

    images = np.asarray(images, np.float32)
    for image in images:
        x = image.reshape(descriptor.full.inputs[0].shape)
        run(descriptor.full.key, image=x)
        a = x
        for spec in descriptor.stages:
            a = run(spec.signature.key, activation=a, centres=spec.centres)["next_activation"]
        run(descriptor.head.key, activation=a)
    outputs = tuple(
        OutputAgreement(key, name, d, scale,
                        tol.get(name, Tolerance(tol["probabilities"].atol)).limit(scale))
        for (key, name), (d, scale) in diffs.items())
    return AgreementReport(precision, len(images), outputs)


def require_agreement(report: AgreementReport) -> None:
    """Raises AgreementError naming every output beyond its tolerance."""
    if not report.ok:
        raise AgreementError(
            f"The backend disagrees with the CPU ({report.precision} tolerances): "
            + "; ".join(f"{o.signature}/{o.output} differs by {o.max_abs_diff:.3g} "
                        f"(limit {o.limit:.3g})" for o in report.failures))


@dataclasses.dataclass(frozen=True)
class DecisionAgreement:
    frames: int
    identical: int  # Frames with the same class and the same exit stage.
    first_difference: int | None  # Frame index, or None.

    @property
    def ok(self) -> bool:
        return self.identical == self.frames


def compare_decisions(model_content: bytes, backend, frames: np.ndarray,
                      reference=None) -> DecisionAgreement:
    """Runs the early-exit harness on both backends over the same stream.

    The hot-class cache follows each runtime's own answers, so one differing
    decision can change later ones: the count is of frames whose (class, exit
    stage) is identical.
    """

    want_rt = SmtmRuntime(model_content, reference or cpu.CpuBackend(num_threads=1))
    got_rt = SmtmRuntime(model_content, backend)
    shape = want_rt.descriptor.full.inputs[0].shape
    identical, first = 0, None
    for i, frame in enumerate(np.asarray(frames, np.float32)):
        x = frame.reshape(shape)
        same = want_rt.classify_fast(x) == got_rt.classify_fast(x)
        identical += same
        if not same and first is None:
            first = i
    return DecisionAgreement(len(frames), identical, first)
