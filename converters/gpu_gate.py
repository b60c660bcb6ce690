"""The converter's GPU gate: compile every signature strictly on the GPU path.

TFLite's static analyzer (`Analyzer.analyze(gpu_compatibility=True)`)
approves ops the GPU accelerator then refuses, so the gate compiles each
signature for real with LiteRT's GPU accelerator in strict mode (on a machine
without a GPU, on Mesa's software Vulkan driver), names the ops that would
fall back to the CPU, and compares the GPU's outputs with the CPU's on real
images (`converters.agreement`).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from converters import agreement
from delegates import gpu


class GpuGateError(RuntimeError):
    """`require_gpu` and a signature is not fully accelerated, or GPU outputs are wrong."""


@dataclasses.dataclass(frozen=True)
class GateReport:
    precision: str
    available: bool  # False: no GPU adapter, nothing was compiled.
    signatures: dict[str, gpu.SignatureAcceleration]
    agreement: agreement.AgreementReport | None = None
    reason: str = ""

    @property
    def fully_accelerated(self) -> bool:
        return self.available and all(s.fully_accelerated for s in self.signatures.values())

    @property
    def ok(self) -> bool:
        return self.fully_accelerated and (self.agreement is None or self.agreement.ok)

    def format(self) -> str:
        if not self.available:
            return f"GPU gate ({self.precision}): no GPU available ({self.reason})"
        lines = [f"GPU gate ({self.precision}, strict, per signature):"]
        for key, s in self.signatures.items():
            lines.append(f"  {key:<10} " + ("fully accelerated" if s.fully_accelerated else
                                            "falls back: " + ", ".join(s.fallback_ops)))
        if self.agreement is not None:
            a = self.agreement
            lines.append(f"  GPU vs CPU on {a.num_samples} images: similarities max diff "
                         f"{a.max_diff('similarities'):.2e}, probabilities "
                         f"{a.max_diff('probabilities'):.2e}; "
                         + ("within the stated tolerances" if a.ok else
                            "OUTSIDE the stated tolerances: "
                            + ", ".join(f"{o.signature}/{o.output} {o.max_abs_diff:.2e} > "
                                        f"{o.limit:.1e}" for o in a.failures)))
        return "\n".join(lines)


def gpu_gate(model_content: bytes, images: np.ndarray | None = None, precision: str = "fp32",
             require_gpu: bool = False) -> GateReport:
    """Compiles every signature strictly on the GPU and checks it against the CPU.

    Args:
      model_content: an SMTM .tflite.
      images: sample frames for the GPU/CPU comparison (None: skip it).
      precision: "fp32" or "fp16".
      require_gpu: raise instead of reporting when a signature falls back, the
        outputs disagree, or no GPU is available.

    Raises:
      GpuGateError: with `require_gpu`, when the gate fails.
    """
    try:
        sigs = gpu.signature_acceleration(model_content, gpu.Precision(precision))
    except gpu.GpuUnavailableError as e:
        if require_gpu:
            raise GpuGateError(f"--require_gpu: {e}") from e
        return GateReport(precision, False, {}, reason=str(e).split(". ")[0])
    report = GateReport(precision, True, sigs)
    if report.fully_accelerated and images is not None and len(images):
        report = dataclasses.replace(report, agreement=agreement.compare_with_cpu(
            model_content, gpu.GpuBackend(strict=True, precision=precision), images,
            precision=precision))
    if require_gpu and not report.ok:
        raise GpuGateError("--require_gpu: the model fails the GPU gate.\n" + report.format())
    return report
