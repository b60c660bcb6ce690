"""Golden decision traces: the Python runtime's class and exit stage on every frame.

`tests/data/golden_traces.npz` holds them for the three demo models (their
committed .keras and semantic memories) on a seeded stream of every kind;
`scripts/golden_traces.py` writes the file and `tests/test_golden.py` checks
that the runtime still decides exactly so. Any runtime that follows the
descriptor's contract must reproduce them frame for frame.
"""

from __future__ import annotations

import os
import tempfile

import numpy as np

from converters import smtm_converter
from smtm_tf.fitting import data as data_lib
from smtm_tf.fitting import kerascompat
from smtm_tf.fitting import streams as streams_lib
from smtm_tf.runtime import SmtmRuntime

DEMO_MODELS = ("demo_resnet", "demo_mobilenet_v2", "demo_vgg")


def convert_demo(name: str, data: data_lib.LabelledData, model_dir: str = "models") -> bytes:
    """The demo model `name` converted with its committed semantic memory."""
    path = os.path.join(model_dir, name + ".keras")
    model = kerascompat.load_model(path)
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, name + ".tflite")
        memory, _ = smtm_converter.convert_model(
            model, data, out, memory_candidates=[smtm_converter.memory_path_for(path)],
            gpu_check=False, old_runtime_check=False, accuracy_check=False)
        if memory.key is None:
            raise ValueError(f"{path}'s memory was refitted: traces need the committed one.")
        with open(out, "rb") as f:
            return f.read()


def decision_traces(runtime: SmtmRuntime, data: data_lib.LabelledData, frames: int,
                    seed: int) -> dict[str, np.ndarray]:
    """Stream kind -> `[frames, 2]` int32 (class, exit stage) from `runtime`,
    each stream started with a fresh memory."""
    out = {}
    for kind in streams_lib.StreamKind:
        stream = streams_lib.make_stream(kind, data.y_test, frames, seed=seed)
        runtime.reset_cache()
        out[kind.value] = np.array([[r.class_id, r.exit_stage] for r in
                                    map(runtime.classify, stream.render(data.x_test))],
                                   np.int32)
    return out
