"""The runtime layer: the descriptor format, the exit policy and adaptive memory,
and the Python host runtime. Needs numpy and ai-edge-litert only (no TensorFlow).

`from smtm_tf.runtime import SmtmRuntime` is all an app needs to run an SMTM
.tflite on camera frames.
"""

from smtm_tf.runtime.descriptor import DescriptorError
from smtm_tf.runtime.host import (FrameError, FrameResult, ModelFileError, SmtmRuntime,
                                  check_state_path, read_descriptor)

__all__ = ["DescriptorError", "FrameError", "FrameResult", "ModelFileError", "SmtmRuntime",
           "check_state_path", "read_descriptor"]
