"""The native runtime's figures beside the Python harness's.

Runs `smtm_cli bench` (native/cli/smtm_cli.cc, built with the native runtime)
on the same .tflite and frames the Python harness measures. The CLI times the
full model and SMTM the way `validation.compare` does (interleaved blocks
after warm-up frames) and host work the way `validation.host_work_us` does, so
the two rows read side by side.
"""

import dataclasses
import os
import subprocess
import tempfile

import numpy as np


class NativeBenchError(RuntimeError):
    """smtm_cli is missing, failed, or printed something this module cannot read."""


@dataclasses.dataclass(frozen=True)
class NativeBench:
    """What `smtm_cli bench` printed for one stream."""

    frames: int
    full_mean_us: float
    smtm_mean_us: float
    speedup: float
    host_work_us: float
    host_self_us: float
    agreement_with_full: float
    exit_shares: tuple[float, ...]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_FIELDS = {f.name: f.type for f in dataclasses.fields(NativeBench)}


def parse(output: str) -> NativeBench:
    """Reads the `name value...` lines `smtm_cli bench` prints."""
    values = {}
    for line in output.splitlines():
        name, *rest = line.split()
        if name in _FIELDS and rest:
            values[name] = rest
    missing = sorted(set(_FIELDS) - set(values))
    if missing:
        raise NativeBenchError(f"smtm_cli bench printed no {', '.join(missing)}; "
                               f"its output was:\n{output.strip()}")
    try:
        return NativeBench(
            frames=int(values["frames"][0]),
            exit_shares=tuple(float(v) for v in values["exit_shares"]),
            **{k: float(v[0]) for k, v in values.items()
               if k not in ("frames", "exit_shares")})
    except ValueError as e:
        raise NativeBenchError(f"smtm_cli bench printed a value that is not a number ({e}); "
                               f"its output was:\n{output.strip()}") from e


def require_cli(cli: str) -> None:
    """Raises NativeBenchError, saying how to build it, unless `cli` is executable."""
    if not os.path.isfile(cli) or not os.access(cli, os.X_OK):
        raise NativeBenchError(
            f"{cli} is not an executable smtm_cli: build it with `cmake -S native -B "
            "native/build -DCMAKE_BUILD_TYPE=RelWithDebInfo && cmake --build native/build` "
            "and pass native/build/smtm_cli.")


def bench(cli: str, model_path: str, frames: np.ndarray, *, warmup: int = 50,
          block: int = 100, threads: int = 1, backend: str = "cpu") -> NativeBench:
    """Runs `smtm_cli bench` on `frames` (camera pixels, [N, H, W, C]).

    The frames go to a temporary .npy that is removed afterwards.
    """
    require_cli(cli)
    with tempfile.TemporaryDirectory(prefix="smtm-native-bench-") as tmp:
        path = os.path.join(tmp, "frames.npy")
        np.save(path, np.ascontiguousarray(frames, np.float32))
        proc = subprocess.run(
            [cli, "bench", f"--model={model_path}", f"--frames={path}", f"--warmup={warmup}",
             f"--block={block}", f"--threads={threads}", f"--backend={backend}"],
            capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise NativeBenchError(f"{cli} bench exited with {proc.returncode}: "
                               f"{proc.stderr.strip() or proc.stdout.strip()}")
    return parse(proc.stdout)


def format_table(rows: list) -> str:
    """A markdown table of (stream, Comparison, NativeBench) rows: each runtime's
    figures on the same frames, Python first."""
    lines = ["| stream | full us (Python / native) | SMTM us (Python / native) | "
             "speed-up (Python / native) | SMTM agrees w/ full (Python / native) | "
             "native host work us (difference / timed) |", "|---|---|---|---|---|---|"]
    for stream, c, n in rows:
        lines.append(
            f"| {stream} | {c.full.mean_us:.0f} / {n.full_mean_us:.0f} | "
            f"{c.smtm.mean_us:.0f} / {n.smtm_mean_us:.0f} | "
            f"{c.speedup:.2f}x / {n.speedup:.2f}x | "
            f"{100 * c.smtm.agreement:.2f}% / {100 * n.agreement_with_full:.2f}% | "
            f"{n.host_work_us:.2f} / {n.host_self_us:.2f} |")
    return "\n".join(lines)
