"""CI: the host runtime runs with only numpy and ai-edge-litert installed.

Run by .ci/runtime_only.sh in a virtualenv holding nothing else: imports
`SmtmRuntime`, runs the given SMTM .tflite on a video stream of Fashion-MNIST
test images, and fails if TensorFlow or Keras got imported, or if the early
exits disagree with the model's own `full` answers on more than 5% of frames.
"""

import argparse
import sys

import numpy as np

from smtm_tf.fitting import data as data_lib
from smtm_tf.fitting import streams
from smtm_tf.runtime import SmtmRuntime


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("model", help="An SMTM .tflite.")
    parser.add_argument("--frames", type=int, default=500)
    args = parser.parse_args()
    with open(args.model, "rb") as f:
        runtime = SmtmRuntime(f.read())
    data = data_lib.load_fashion_mnist()
    shape = runtime.descriptor.full.inputs[0].shape
    images = data_lib.adapt_images(data.x_test, shape[1:3], shape[3])
    stream = streams.make_stream("video", data.y_test, args.frames, seed=0)
    frames = stream.render(images)
    answers = [runtime.classify(f) for f in frames]
    full = np.array([runtime.classify_full(np.ascontiguousarray(f[None])) for f in frames])
    got = np.array([a.class_id for a in answers])
    exits = np.bincount([a.exit_stage for a in answers], minlength=runtime.num_stages + 1)
    heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("tensorflow", "keras", "tf_keras"))
    agreement = float((got == full).mean())
    print(f"{args.frames} video frames: agreement with full {100 * agreement:.2f}%, exits per "
          f"stage and head {exits.tolist()}; TensorFlow/Keras modules loaded: {heavy[:3]}")
    return 0 if not heavy and agreement >= 0.95 and exits[:-1].sum() > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
