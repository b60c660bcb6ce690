"""The flags of the command lines that fit a memory to a user's model.

Importing this module defines `--preprocessing`, `--input_scale` and
`--input_offset` (`resolve(model)` turns them, or the model's own first
layer, into the `Preprocessing` the model expects done to camera pixels), and
the memory's shape and calibration: `--num_stages`, `--cut_layers`,
`--embedding_dim`, `--encoder_hidden`, `--pooling`, `--camera_calibration`.
"""

from absl import app
from absl import flags

from smtm_tf.fitting import encoders as enc
from smtm_tf.fitting import memory as memory_lib
from smtm_tf.runtime import preprocessing as prep

PREPROCESSING = flags.DEFINE_enum(
    "preprocessing", None, [p.value for p in prep.Preset],
    "What the model expects done to pixels (0..255) outside it: raw (nothing), unit "
    "(x/255), symmetric (x/127.5-1), imagenet ((x/255-mean)/std, RGB). Default: none, or "
    "what the model's first Rescaling/Normalization layer does itself.")
INPUT_SCALE = flags.DEFINE_list(
    "input_scale", None, "The model sees pixel*scale+offset: scale, one value or one per "
    "channel (instead of --preprocessing).")
INPUT_OFFSET = flags.DEFINE_list("input_offset", None,
                                 "offset, one value or one per channel (see --input_scale).")
NUM_STAGES = flags.DEFINE_integer(
    "num_stages", None, "Stages when --cut_layers is not set. Default: 6 are planned (fewer "
    "on a model with fewer spatial cut points), and "
    "those whose exits on the calibration streams do not pay for their measured time are "
    "dropped; a number given here is kept.")
CUT_LAYERS = flags.DEFINE_list("cut_layers", None, "Layer names that end each stage.")
EMBEDDING_DIM = flags.DEFINE_integer("embedding_dim", None,
                                     "Semantic vector size (default 32).")
ENCODER_HIDDEN = flags.DEFINE_integer(
    "encoder_hidden", None, "Hidden ReLU units in each stage's semantic encoder, 0 for a "
    f"linear projection (default {memory_lib.ENCODER_HIDDEN}).", lower_bound=0)
POOLING = flags.DEFINE_enum(
    "pooling", None, [p.value for p in enc.Pooling],
    "How each stage's feature map is pooled before its encoder: avg (global mean), avg_max "
    "(global mean and max), grid (the means of its four quadrants and the global max) "
    f"(default {memory_lib.POOLING.value}).")
CAMERA_CALIBRATION = flags.DEFINE_bool(
    "camera_calibration", False, "Calibrate the exits on camera streams too (held objects "
    "with jitter, brightness, noise, a pan), with a bound that allows for errors in runs: "
    "the budget holds on what a handheld camera sends, at a cost in early exits.")


def memory_choices() -> dict:
    """The memory's shape and calibration as the flags give them (None: the default)."""
    return {"num_stages": NUM_STAGES.value, "cut_layers": CUT_LAYERS.value,
            "embedding_dim": EMBEDDING_DIM.value, "encoder_hidden": ENCODER_HIDDEN.value,
            "pooling": POOLING.value,
            "camera_calibration": CAMERA_CALIBRATION.value}


def given() -> list[str]:
    """The flags of this module set on the command line (as --name)."""
    return [f"--{f.name}" for f in flags.FLAGS.get_flags_for_module(__name__) if f.present]


def _floats(flag, values):
    if values is None:
        return None
    try:
        return tuple(float(v) for v in values)
    except ValueError as e:
        raise app.UsageError(f"--{flag} takes numbers, got {values}.") from e


def resolve(model) -> prep.Preprocessing:
    """The preprocessing the flags (or the model's first layer) give `model`.

    Raises:
      app.UsageError: a non-number in --input_scale/--input_offset.
      smtm_tf.runtime.preprocessing.PreprocessingError: flags that contradict
        each other or the model.
    """
    return prep.resolve(model, PREPROCESSING.value,
                        _floats("input_scale", INPUT_SCALE.value),
                        _floats("input_offset", INPUT_OFFSET.value))
