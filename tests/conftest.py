"""pytest set-up shared by all tests: quiet TensorFlow, CPU only, no downloads."""

import os

# Set before TensorFlow is first imported (conftest is loaded before the tests).
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
# Keep tf.keras (used by load_image_folder) on Keras 3, as in production.
os.environ.pop("TF_USE_LEGACY_KERAS", None)

# absltest's create_tempdir() reads absl flags, which pytest does not parse;
# accept their defaults (temp files under $TEST_TMPDIR or the system temp dir).
from absl import flags  # pylint: disable=g-import-not-at-top

if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
