"""smtm_tf: semantic memory for early-exit CNN inference, Keras to LiteRT."""

from smtm_tf.callbacks import SemanticMemoryCallback
from smtm_tf.data import DataError, LabelledData, load_data, load_fashion_mnist
from smtm_tf.descriptor import Descriptor, DescriptorError
from smtm_tf.encoders import Centres, Pooling
from smtm_tf.exit_policy import ExitRule, Metric, calibrate
from smtm_tf.memory import MemoryFileError, SemanticMemory, fit_semantic_memory
from smtm_tf.runtime import ModelFileError, SmtmRuntime, read_descriptor
from smtm_tf.stages import StagePlan, StagePlanError, plan_stages, split_model
from smtm_tf.streams import Stream, StreamKind, make_stream

__version__ = "0.1.0"

__all__ = [
    "Centres", "DataError", "Descriptor", "DescriptorError", "ExitRule", "LabelledData",
    "MemoryFileError", "Metric", "ModelFileError", "Pooling", "SemanticMemory",
    "SemanticMemoryCallback", "SmtmRuntime", "StagePlan", "StagePlanError", "Stream",
    "StreamKind", "calibrate", "fit_semantic_memory", "load_data", "load_fashion_mnist",
    "make_stream", "plan_stages", "read_descriptor", "split_model",
]
