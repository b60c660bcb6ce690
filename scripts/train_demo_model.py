"""Trains the ResNet-style demo model on Fashion-MNIST.

Example:
    python scripts/train_demo_model.py --output=models/demo_resnet.keras
"""

from scripts import command_line  # First: quiets native logs before TensorFlow loads.

from absl import flags
from absl import logging

from smtm_tf.fitting import data as data_lib
from smtm_tf.fitting import models

_OUTPUT = flags.DEFINE_string("output", "models/demo_resnet.keras",
                              "Where to write the trained .keras model.")
_EPOCHS = flags.DEFINE_integer("epochs", 8, "Training epochs.")
_HOLDOUT = flags.DEFINE_float(
    "holdout", 0.1, "Tail fraction of the train split kept out of training "
    "(used for validation here and for calibration by the converter).")
_SEED = flags.DEFINE_integer("seed", 0, "Random seed.")
_BLOCKS = flags.DEFINE_integer("blocks_per_stage", 2, "Residual blocks per stage.")


def main(argv):
    del argv
    data = data_lib.load_fashion_mnist()
    (x_fit, y_fit), (x_val, y_val) = data.holdout(_HOLDOUT.value)
    model = models.train_demo_model(x_fit, y_fit, x_val, y_val,
                                  epochs=_EPOCHS.value, seed=_SEED.value,
                                    blocks_per_stage=_BLOCKS.value)
    _, acc = model.evaluate(data.x_test, data.y_test, verbose=0)
    logging.info("Test accuracy: %.4f", acc)
    print(f"test accuracy: {acc:.4f}")
    models.save_model_atomic(model, _OUTPUT.value)
    print(f"wrote {_OUTPUT.value}")


def run():
    command_line.run(main)


if __name__ == "__main__":
    run()
