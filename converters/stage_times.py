"""What each signature of an SMTM .tflite costs on this machine's CPU, where a frame meets it.

Stages are planned and exits calibrated in multiply-adds; the converter
keeps the planned stages whose exits pay for these times
(`smtm_converter.drop_stages_by_time`). A stage's time also
holds what they miss: reading weights (the depthwise models' late layers and
heads), the call into its own runtime, the copy of its input. Here each
signature is timed inside the chain a frame that runs to the head goes
through (stage 0, 1, ..., then the head, one after the other), so it finds
the caches as the signature before it left them, and `full` on the same
frames, in blocks that alternate with the chain's. On the zoo these times
priced the native runtime's exits within 6% of its measured speed-up on six
of seven models, where multiply-adds overstated it by up to 25%
(docs/model_zoo.md).
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np

from delegates import cpu
from smtm_tf.fitting import stages as stages_lib
from smtm_tf.runtime import SmtmRuntime


@dataclasses.dataclass(frozen=True)
class StageTimes:
    """Median microseconds per frame, each with the copy of its input."""

    stages_us: tuple[float, ...]  # Each stage signature, inside the chain.
    head_us: float  # The head, after the last stage.
    full_us: float  # `full` alone.

    @property
    def chain_us(self) -> float:
        """A frame that runs every stage and the head."""
        return sum(self.stages_us) + self.head_us

    def shares(self) -> tuple[float, ...]:
        """Each stage's, then the head's, share of the chain's time."""
        return tuple(t / self.chain_us for t in self.stages_us + (self.head_us,))

    def format(self, plan: "stages_lib.StagePlan | None" = None) -> str:
        """One line for people; with the plan's multiply-add shares beside the times'."""
        parts = [f"stage {s} {t:.1f} us" for s, t in enumerate(self.stages_us)]
        text = ("time per frame on this CPU (XNNPACK, 1 thread), each signature inside the "
                f"chain: {', '.join(parts)}, head {self.head_us:.1f} us; shares "
                + "/".join(f"{100 * s:.0f}" for s in self.shares()) + "%")
        if plan is not None:
            macs = plan.stage_costs + (plan.head_cost,)
            text += " against multiply-adds " + "/".join(f"{100 * c:.0f}" for c in macs) + "%"
        return (text + f"; the whole chain {self.chain_us / self.full_us:.2f}x `full` "
                f"({self.full_us:.1f} us)")


def measure(model_content: bytes, inputs: np.ndarray, rounds: int = 3) -> StageTimes:
    """Times the signatures of an SMTM .tflite on the CPU (XNNPACK, 1 thread).

    Args:
      model_content: the .tflite bytes.
      inputs: model inputs `[N, H, W, C]` (preprocessed, as `full` takes them).
      rounds: passes over `inputs`, each one of the chain and one of `full`,
        in alternating order.
    """
    if rounds < 1 or len(inputs) == 0:
        raise ValueError(f"measure needs rounds >= 1 and inputs, got {rounds} rounds and "
                         f"{len(inputs)} inputs.")
    runtime = SmtmRuntime(model_content, cpu.CpuBackend(num_threads=1))
    d, session = runtime.descriptor, runtime.session
    chain = []
    source = None
    for spec in d.stages:
        sig = session.signature(spec.signature.key)
        chain.append((sig.input_view("activation"), sig.invoke, source))
        source = sig.output_view("next_activation")
    head = session.signature(d.head.key)
    chain.append((head.input_view("activation"), head.invoke, source))
    full = session.signature(d.full.key)
    full_in, full_invoke = full.input_view("image"), full.invoke
    frames = np.ascontiguousarray(inputs, np.float32).reshape(
        (len(inputs),) + tuple(d.full.inputs[0].shape))
    clock = time.perf_counter_ns
    parts = np.empty((rounds, len(frames), len(chain)), np.int64)
    whole = np.empty((rounds, len(frames)), np.int64)

    def run_chain(r):
        for i, frame in enumerate(frames):
            for j, (dst, invoke, src) in enumerate(chain):
                t0 = clock()
                np.copyto(dst, frame if src is None else src)
                invoke()
                parts[r, i, j] = clock() - t0

    def run_full(r):
        for i, frame in enumerate(frames):
            t0 = clock()
            np.copyto(full_in, frame)
            full_invoke()
            whole[r, i] = clock() - t0

    run_chain(0)  # Warm-up: packs every signature's weights once, untimed.
    run_full(0)
    for r in range(rounds):
        for run in (run_chain, run_full) if r % 2 == 0 else (run_full, run_chain):
            run(r)
    medians = np.median(parts.reshape(-1, len(chain)), axis=0) / 1e3
    return StageTimes(tuple(float(t) for t in medians[:-1]), float(medians[-1]),
                      float(np.median(whole)) / 1e3)
