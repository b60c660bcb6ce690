"""Byte flips over a whole .tflite: refused, same answers, or something worse?

Each damaged copy is loaded with `host.SmtmRuntime` and, when it loads, asked for
the answers to a few frames. Outcomes: "refused" (ModelFileError), "same"
(the intact model's answers), "different" (a silently wrong answer), "error"
(another exception type), "signal" (the process died: a crash in native
code) and "hang". Loads run in a worker process, so a crash is seen and
named rather than taking the caller down; the worker restarts after it. Its
address space is capped (MEMORY_LIMIT_BYTES), so a damaged shape that asks
for tens of GB fails there rather than exhausting the machine.

`python -m smtm_tf.evaluation.byte_flips WORKDIR` is that worker.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import resource
import selectors
import subprocess
import sys
import tempfile

from ai_edge_litert.tools import flatbuffer_utils
import numpy as np

from smtm_tf.runtime import host
from smtm_tf.runtime import metadata

OUTCOMES = ("refused", "same", "different", "error", "signal", "hang")


def random_flips(positions, count: int, max_bytes: int = 1,
                 seed: int = 0) -> list[list[tuple[int, int]]]:
    """`count` damages, each 1..max_bytes (position, xor mask) pairs drawn from
    `positions` (a file size: every byte)."""
    rng = np.random.default_rng(seed)
    positions = np.arange(positions) if np.isscalar(positions) else np.asarray(positions)
    out = []
    for _ in range(count):
        k = int(rng.integers(1, max_bytes + 1))
        picked = rng.choice(positions, k, replace=False)
        out.append([(int(p), int(rng.integers(1, 256))) for p in sorted(picked)])
    return out


def structure_positions(model: bytes) -> np.ndarray:
    """Every byte of the file outside the buffers: the graph's structure
    (tables, vtables, tensor and operator records, names, signatures, padding)."""
    inside = np.zeros(len(model), bool)
    for start, end in metadata.buffer_regions(model):
        inside[start:end] = True
    return np.flatnonzero(~inside)


def with_record(model: bytes, kind: str) -> bytes:
    """The model with the integrity record of `kind`: "file" (what the
    converter writes), "buffers" (files converted before it: weights and
    descriptor only) or "none" (older still)."""
    m = flatbuffer_utils.read_model_from_bytearray(bytearray(model))
    m.metadata = [e for e in m.metadata if e.name != metadata.DIGEST_NAME.encode()]
    bare = bytes(flatbuffer_utils.convert_object_to_bytearray(m))
    if kind == "none":
        return bare
    if kind == "buffers":
        return metadata.add_metadata(bare, metadata.DIGEST_NAME,
                                     metadata.content_digest(bare).encode())
    if kind == "file":
        return metadata.add_digest(bare)
    raise ValueError(f"record kind must be file, buffers or none, got {kind!r}.")


@dataclasses.dataclass(frozen=True)
class FlipReport:
    counts: dict  # outcome -> number of damaged copies.
    examples: dict  # outcome -> up to 5 (flips, detail) of it.

    def format(self) -> str:
        total = sum(self.counts.values())
        text = f"{total} damaged copies: " + ", ".join(
            f"{k} {self.counts.get(k, 0)}" for k in OUTCOMES)
        for k in ("different", "error", "signal", "hang"):
            for flips, detail in self.examples.get(k, [])[:3]:
                text += f"\n  {k}: bytes {flips}: {detail}"
        return text


def run_flips(model: bytes, frames: np.ndarray, flips, timeout_s: float = 120) -> FlipReport:
    """Loads `model` damaged by each entry of `flips` in a worker process.

    Args:
      model: the intact .tflite.
      frames: frames shaped like the model's input, to compare answers on.
      flips: a list of [(position, xor mask), ...] damages.
      timeout_s: how long one damaged copy may take before it counts as a hang.
    """
    counts, examples = collections.Counter(), collections.defaultdict(list)
    with tempfile.TemporaryDirectory(prefix="smtm-flips-") as work:
        with open(os.path.join(work, "model.tflite"), "wb") as f:
            f.write(model)
        np.save(os.path.join(work, "frames.npy"), np.asarray(frames, np.float32))
        start = 0
        while start < len(flips):
            with open(os.path.join(work, "flips.json"), "w") as f:
                json.dump(flips[start:], f)
            done, status = _run_worker(work, timeout_s)
            for outcome, detail in done:
                counts[outcome] += 1
                if outcome != "refused" and outcome != "same":
                    examples[outcome].append((flips[start], detail))
                start += 1
            if status is not None and start < len(flips):
                counts[status[0]] += 1
                examples[status[0]].append((flips[start], status[1]))
                start += 1
    return FlipReport(dict(counts), dict(examples))


def _run_worker(work: str, timeout_s: float):
    """([(outcome, detail)] it reported, None or (signal|hang, detail) it ended with)."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL=os.environ.get("TF_CPP_MIN_LOG_LEVEL", "3"))
    proc = subprocess.Popen([sys.executable, "-m", "smtm_tf.evaluation.byte_flips", work],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env=env)
    done = []
    status = None
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    while True:
        if not sel.select(timeout_s):
            proc.kill()
            proc.wait()
            status = ("hang", f"no answer in {timeout_s:.0f} s")
            break
        line = proc.stdout.readline()
        if not line:
            proc.wait()
            if proc.returncode < 0:
                status = ("signal", f"killed by signal {-proc.returncode}")
            elif proc.returncode:
                status = ("error", f"the worker exited {proc.returncode}")
            break
        record = json.loads(line)
        done.append((record["outcome"], record.get("detail", "")))
    proc.stdout.close()
    return done, status


def _answers(rt: host.SmtmRuntime, frames: np.ndarray) -> list:
    return [tuple(int(v) for v in rt.classify_fast(f)) for f in frames]


# The worker's address space: a damaged shape can make the interpreter
# allocate tens of GB (measured: 19 GB resident); the limit turns that into a
# failed allocation instead of a machine out of memory.
MEMORY_LIMIT_BYTES = 4 << 30


def _worker(work: str) -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT_BYTES, MEMORY_LIMIT_BYTES))
    with open(os.path.join(work, "model.tflite"), "rb") as f:
        model = f.read()
    frames = np.ascontiguousarray(np.load(os.path.join(work, "frames.npy")))
    with open(os.path.join(work, "flips.json")) as f:
        flips = json.load(f)
    want = _answers(host.SmtmRuntime(model), frames)
    for damage in flips:
        bad = bytearray(model)
        for pos, mask in damage:
            bad[pos] ^= mask
        record = {}
        try:
            rt = host.SmtmRuntime(bytes(bad))
            got = _answers(rt, frames)
            record["outcome"] = "same" if got == want else "different"
            if got != want:
                record["detail"] = (f"{sum(a != b for a, b in zip(got, want))} of "
                                    f"{len(want)} answers differ")
        except host.ModelFileError as e:
            record = {"outcome": "refused", "detail": str(e)[:200]}
        except Exception as e:  # pylint: disable=broad-except
            record = {"outcome": "error", "detail": f"{type(e).__name__}: {str(e)[:200]}"}
        print(json.dumps(record), flush=True)


if __name__ == "__main__":
    _worker(sys.argv[1])
