"""Damages copies of an SMTM .tflite byte by byte and reports what loading them gives.

Example:
  python scripts/byte_flips.py --model=model.smtm.tflite --data=fashion_mnist \
      --flips=1000 --max_bytes=16 --record=file,buffers,none

Each copy has 1..--max_bytes bytes XORed with random masks at random places
of the whole file (or, --where=structure, of the bytes outside the buffers).
With each integrity record (`file`: what the converter writes; `buffers`:
files converted before it; `none`: older still) the table
counts copies refused (ModelFileError), answering as the intact model on the
data's first test frames, answering differently, raising another error,
crashing (a signal) or hanging. Loads run in a worker process.
"""

from scripts import command_line  # First: quiets native logs before TensorFlow loads.

from absl import flags
import numpy as np

from smtm_tf.evaluation import byte_flips
from smtm_tf.fitting import data as data_lib
from smtm_tf.runtime import read_descriptor

_MODEL = flags.DEFINE_string("model", None, "SMTM .tflite to damage.", required=True)
_DATA = flags.DEFINE_string("data", "fashion_mnist", "Data whose test frames are asked.")
_FRAMES = flags.DEFINE_integer("frames", 20, "Frames whose answers are compared.")
_FLIPS = flags.DEFINE_integer("flips", 1000, "Damaged copies per record kind.")
_MAX_BYTES = flags.DEFINE_integer("max_bytes", 1, "Bytes damaged per copy: 1..this.")
_RECORD = flags.DEFINE_list("record", ["file", "buffers", "none"],
                            "Integrity records to measure: file, buffers, none.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the damage.")
_WHERE = flags.DEFINE_enum("where", "file", ["file", "structure"],
                           "Damage anywhere in the file, or only outside the buffers "
                           "(the graph's structure).")


def main(argv):
    del argv
    with open(_MODEL.value, "rb") as f:
        model = f.read()
    shape = read_descriptor(model).full.inputs[0].shape
    data = data_lib.load_data(_DATA.value, image_size=tuple(shape[1:3]), channels=shape[3])
    frames = np.ascontiguousarray(data.x_test[:_FRAMES.value], np.float32).reshape(
        (-1,) + tuple(shape))
    print("| record | copies | " + " | ".join(byte_flips.OUTCOMES) + " |")
    print("|---|---|" + "---|" * len(byte_flips.OUTCOMES))
    notes = []
    for kind in _RECORD.value:
        damaged = byte_flips.with_record(model, kind)
        positions = (len(damaged) if _WHERE.value == "file"
                     else byte_flips.structure_positions(damaged))
        flips = byte_flips.random_flips(positions, _FLIPS.value, _MAX_BYTES.value,
                                        seed=_SEED.value)
        report = byte_flips.run_flips(damaged, frames, flips)
        print(f"| {kind} | {len(flips)} | "
              + " | ".join(str(report.counts.get(k, 0)) for k in byte_flips.OUTCOMES) + " |",
              flush=True)
        notes += [f"{kind}: {line.strip()}" for line in report.format().splitlines()[1:]]
    for line in notes:
        print(line)


def run():
    command_line.run(main)


if __name__ == "__main__":
    run()
