"""Writes golden decision traces: the Python runtime's class and exit stage per frame.

Examples:
  python scripts/golden_traces.py --output=tests/data/golden_traces.npz
  python scripts/golden_traces.py --export_dir=/tmp/golden_export

For each demo model (its committed .keras and semantic memory, converted
here) and every stream kind, a seeded stream of Fashion-MNIST test frames is
run through `SmtmRuntime.classify`; the file records each stream's image
indices, seed and the (class, exit stage) of every frame. Any runtime that
follows the descriptor's contract must reproduce them (`tests/test_golden.py`).

`--export_dir` writes what another runtime needs to replay the committed
traces (`--traces`) without Python: per model `<model>.tflite`, per stream
kind `<model>/<kind>.frames.npy` (float32 pixels `[N, H, W, C]`) and
`<model>/<kind>.decisions.npy` (int32 `[N, 2]` class, exit stage), and
`<model>/full_probabilities.npy`: the `full` signature's probabilities on the
first video frames as this Python runtime computes them, and
`stream_kinds.txt`, the stream kinds, one per line. The
script refuses to export if the Python runtime no longer makes the committed
decisions (they would not be golden).
"""

from scripts import command_line  # First: quiets native logs before TensorFlow loads.

import os

from absl import app
from absl import flags
import numpy as np

from smtm_tf.fitting import data as data_lib
from smtm_tf.fitting import streams as streams_lib
from smtm_tf.runtime import io_utils
from smtm_tf.evaluation import golden
from smtm_tf.runtime import SmtmRuntime

_OUTPUT = flags.DEFINE_string("output", None, "Where to write the traces (.npz).")
_EXPORT_DIR = flags.DEFINE_string(
    "export_dir", None, "Where to export models, frames and the committed decisions for "
    "replay by another runtime.")
_TRACES = flags.DEFINE_string("traces", "tests/data/golden_traces.npz",
                              "The committed traces that --export_dir exports.")
_MODELS = flags.DEFINE_list("models", list(golden.DEMO_MODELS),
                            "Demo models under models/.")
_FRAMES = flags.DEFINE_integer("frames", 300, "Frames per stream.")
_SEED = flags.DEFINE_integer("seed", 7, "Stream seed.")


_PROBABILITY_FRAMES = 16


def _export(name: str, model: bytes, runtime: SmtmRuntime, got: dict, data,
            committed: dict) -> None:
    """Writes `name`'s model, frames and committed decisions under --export_dir."""
    frames, seed = int(committed["frames"]), int(committed["seed"])
    directory = os.path.join(_EXPORT_DIR.value, name)
    os.makedirs(directory, exist_ok=True)
    for kind, decisions in got.items():
        want = committed.get(f"{name}/{kind}")
        if want is None or not np.array_equal(decisions, want):
            raise SystemExit(f"{name} {kind}: the Python runtime's decisions are not the "
                             f"committed ones in {_TRACES.value}; fix that before exporting.")
        stream = streams_lib.make_stream(streams_lib.StreamKind(kind), data.y_test, frames,
                                         seed=seed)
        np.save(os.path.join(directory, f"{kind}.frames.npy"),
                np.ascontiguousarray(stream.render(data.x_test), np.float32))
        np.save(os.path.join(directory, f"{kind}.decisions.npy"), want.astype(np.int32))
        if kind == streams_lib.StreamKind.VIDEO.value:
            full = runtime.session.signature(runtime.descriptor.full.key)
            shape = runtime.descriptor.full.inputs[0].shape
            frames_in = stream.render(data.x_test)[:_PROBABILITY_FRAMES]
            probabilities = [full(image=runtime.preprocessing.apply(
                frame.reshape(shape).astype(np.float32)))["probabilities"].reshape(-1)
                for frame in frames_in]
            np.save(os.path.join(directory, "full_probabilities.npy"),
                    np.asarray(probabilities, np.float32))
    with open(os.path.join(_EXPORT_DIR.value, name + ".tflite"), "wb") as f:
        f.write(model)


def main(argv):
    del argv
    if not _OUTPUT.value and not _EXPORT_DIR.value:
        raise app.UsageError("Give --output (write traces) or --export_dir (export them).")
    committed = None
    frames, seed = _FRAMES.value, _SEED.value
    if _EXPORT_DIR.value:
        with np.load(_TRACES.value) as f:
            committed = {k: f[k] for k in f.files}
        frames, seed = int(committed["frames"]), int(committed["seed"])
    data = data_lib.load_fashion_mnist()
    arrays = {"frames": np.array(frames), "seed": np.array(seed)}
    for name in _MODELS.value:
        print(f"{name}: converting with its committed memory", flush=True)
        model = golden.convert_demo(name, data)
        runtime = SmtmRuntime(model)
        got = golden.decision_traces(runtime, data, frames, seed)
        for kind, decisions in got.items():
            arrays[f"{name}/{kind}"] = decisions
            print(f"{name} {kind}: exits per stage and head "
                  f"{np.bincount(decisions[:, 1], minlength=runtime.num_stages + 1)}",
                  flush=True)
        if committed is not None:
            _export(name, model, runtime, got, data, committed)
    if _OUTPUT.value:
        io_utils.write_npz_atomic(_OUTPUT.value, arrays, compressed=True)
        print(f"wrote {_OUTPUT.value}")
    if _EXPORT_DIR.value:
        # The kinds to replay, one per line: the native tests read them here.
        io_utils.write_bytes_atomic(
            os.path.join(_EXPORT_DIR.value, "stream_kinds.txt"),
            "".join(f"{k.value}\n" for k in streams_lib.StreamKind).encode())
        print(f"exported to {_EXPORT_DIR.value}")


if __name__ == "__main__":
    command_line.run(main)
