"""Measures an SMTM .tflite against its own full model on a stream of frames.

Example:
  python scripts/validate.py --model=model.smtm.tflite --data=fashion_mnist --stream=video
"""

from scripts import command_line  # First: quiets native logs before TensorFlow loads.

import dataclasses
import json
import os

import numpy as np

from absl import app
from absl import flags

from converters import agreement
from delegates import backend_flags
from smtm_tf.fitting import data as data_lib
from smtm_tf.runtime import io_utils
from smtm_tf.runtime import metadata
from smtm_tf.fitting import streams
from smtm_tf.evaluation import native_bench
from smtm_tf.evaluation import validation
from smtm_tf.runtime import SmtmRuntime, check_state_path

_MODEL = flags.DEFINE_string("model", None, "SMTM .tflite to validate.", required=True)
_DATA = flags.DEFINE_string("data", "fashion_mnist",
                            "Data whose test split the stream draws from.")
_STREAMS = flags.DEFINE_list(
    "stream", ["video"], "Stream kinds: " + ", ".join(k.value for k in streams.StreamKind) + ".")
_FRAMES = flags.DEFINE_integer("frames", 2000, "Frames per stream.")
_SEED = flags.DEFINE_integer("seed", 0, "Stream seed.")
_ZIPF_EXPONENT = flags.DEFINE_float("zipf_exponent", 1.2, "Exponent of the zipf stream.")
_JSON = flags.DEFINE_string("json_output", None, "Also write the figures as JSON here.")
_PLOT_DIR = flags.DEFINE_string(
    "plot_dir", None, "Write a PNG of hit rate and latency over each stream here "
    "(needs matplotlib: pip install -e '.[plots]').")
_STATE = flags.DEFINE_string(
    "state", None, "Memory state file: restored before the first stream if it exists "
    "(a corrupted or mismatched one is reported and ignored) and saved after the last.")


def _native_backend() -> str:
    """smtm_cli's --backend for the backend flags (LiteRT's CPU or GPU accelerator)."""
    if backend_flags.DELEGATE_LIBRARY.value or backend_flags.BACKEND.value not in ("cpu", "gpu"):
        raise app.UsageError(
            "--native_cli runs LiteRT's CPU or GPU accelerator: use --backend=cpu or "
            "--backend=gpu without --delegate_library.")
    if backend_flags.BACKEND.value == "cpu":
        return "cpu"
    return "gpu" if backend_flags.GPU_PRECISION.value == "fp32" else "gpu16"


def main(argv):
    del argv
    native_backend = None
    if command_line.NATIVE_CLI.value:
        native_backend = _native_backend()
        native_bench.require_cli(command_line.NATIVE_CLI.value)  # Before the long run.
    if _STATE.value:
        # Fail now, not after the whole run, if the state cannot be saved.
        check_state_path(_STATE.value)
    runtime = SmtmRuntime.from_file(_MODEL.value,
                                    backend_flags.make_backend())
    with open(_MODEL.value, "rb") as f:
        # SmtmRuntime refused a file that does not match its record.
        print(f"integrity: {metadata.INTEGRITY_NOTES[metadata.record_kind(f.read())]}")
    shape = runtime.descriptor.full.inputs[0].shape
    data = data_lib.load_data(_DATA.value, image_size=tuple(shape[1:3]), channels=shape[3])
    if backend_flags.BACKEND.value != "cpu" or backend_flags.DELEGATE_LIBRARY.value:
        # A GPU kernel can be wrong without an error: check before measuring.
        with open(_MODEL.value, "rb") as f:
            check = agreement.compare_with_cpu(f.read(), backend_flags.make_backend(),
                                               data.x_test[:16],
                                               precision=backend_flags.GPU_PRECISION.value)
        print(f"{backend_flags.describe()} vs CPU on 16 images "
              f"({check.precision} tolerances):\n{check.format()}")
        agreement.require_agreement(check)
    rows, recoveries, native_rows = [], {}, []
    if _STATE.value and os.path.exists(_STATE.value):
        runtime.load_state(_STATE.value)
    for kind in _STREAMS.value:
        stream = streams.make_stream(kind, data.y_test, _FRAMES.value, seed=_SEED.value,
                                     zipf_exponent=_ZIPF_EXPONENT.value)
        print(f"running {kind}: {len(stream)} frames, full and SMTM interleaved ...",
              flush=True)
        frames = stream.render(data.x_test)
        comparison = validation.compare(runtime, frames, stream.labels,
                                        keep_state=bool(_STATE.value))
        rows.append((kind, comparison))
        if command_line.NATIVE_CLI.value:
            print(f"running {kind} on the native runtime "
                  f"({command_line.NATIVE_CLI.value} bench) ...", flush=True)
            native_rows.append((kind, comparison, native_bench.bench(
                command_line.NATIVE_CLI.value, _MODEL.value, frames,
                threads=backend_flags.THREADS.value, backend=native_backend)))
        if len(stream.scene_starts) > 1 and runtime.cache_policy is not None:
            recoveries[kind] = validation.recovery_frames(comparison.hits, stream.scene_starts)
        if _PLOT_DIR.value:
            os.makedirs(_PLOT_DIR.value, exist_ok=True)
            path = os.path.join(_PLOT_DIR.value, f"{kind}.png")
            validation.plot_stream(path, comparison, stream.scene_starts,
                                   f"{kind}: speed-up {comparison.speedup:.2f}x")
            print(f"wrote {path}")
    if _STATE.value:
        os.makedirs(os.path.dirname(_STATE.value) or ".", exist_ok=True)
        runtime.save_state(_STATE.value)
    print(validation.format_table(rows))
    for kind, c in rows:
        if runtime.cache_policy is not None:
            print(f"{kind}: cache hit rate {100 * c.hits.mean():.1f}%; exits checked against "
                  f"full {int(c.checked.sum())} ({100 * c.checked.mean():.1f}% of frames, "
                  "their time included)", end="")
            if kind in recoveries and recoveries[kind]:
                r = np.asarray(recoveries[kind])
                print(f"; frames to recover 80% of the hit rate after a scene change: "
                      f"median {np.median(r):.0f}, 90th percentile {np.percentile(r, 90):.0f}, "
                      f"max {r.max()} ({len(r)} changes)", end="")
            print()
    overhead = validation.host_work_us(runtime, data.x_test[:500])
    print(f"host work per frame (copies, lookup, policy, adaptation): {overhead:.1f} us, "
          f"{100 * overhead / rows[0][1].full.mean_us:.1f}% of full")
    for kind, c in rows:
        print(f"{kind}: speed-up {c.speedup:.2f}x, top-1 accuracy {-c.accuracy_drop:+.2f} "
              f"points vs full; {c.disagreements.format()}")
    if native_rows:
        print("\nThe native runtime on the same frames (smtm_cli bench):")
        print(native_bench.format_table(native_rows))
    if _JSON.value:
        payload = [{"stream": k, "speedup": c.speedup, "accuracy_drop": c.accuracy_drop,
                    "full": c.full.to_dict(), "smtm": c.smtm.to_dict(),
                    "hit_rate": float(c.hits.mean()),
                    "disagreements": dataclasses.asdict(c.disagreements),
                    "checked_exits": int(c.checked.sum()),
                    "recovery_frames": recoveries.get(k, [])} for k, c in rows]
        for entry, (_, _, n) in zip(payload, native_rows):
            entry["native"] = n.to_dict()
        io_utils.write_bytes_atomic(_JSON.value, json.dumps(payload, indent=2).encode())


def run():
    command_line.run(main)


if __name__ == "__main__":
    run()
