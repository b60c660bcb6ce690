"""smtm_tf: semantic memory for early-exit CNN inference, Keras to LiteRT.

Layers, each a sub-package, importing only downward:
  `delegates` (LiteRT backends) <- `smtm_tf.runtime` (descriptor, policy,
  memory state, host runtime; numpy + ai-edge-litert) <- `smtm_tf.fitting`
  (data, stages, encoders, memory, callback; Keras) <- `converters` <-
  `smtm_tf.evaluation` (streams' harness, baselines, benchmark) <- `scripts`.

The names below are the public API. They are resolved on first use, so
`import smtm_tf` (or `from smtm_tf.runtime import SmtmRuntime`) does not load
Keras or TensorFlow on a device that only runs models.
"""

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "FrameResult": "smtm_tf.runtime.host",
    "ModelFileError": "smtm_tf.runtime.host",
    "SmtmRuntime": "smtm_tf.runtime.host",
    "read_descriptor": "smtm_tf.runtime.host",
    "Descriptor": "smtm_tf.runtime.descriptor",
    "DescriptorError": "smtm_tf.runtime.descriptor",
    "ExitRule": "smtm_tf.runtime.exit_policy",
    "Metric": "smtm_tf.runtime.exit_policy",
    "calibrate": "smtm_tf.runtime.exit_policy",
    "Preprocessing": "smtm_tf.runtime.preprocessing",
    "SemanticMemoryCallback": "smtm_tf.fitting.callbacks",
    "DataError": "smtm_tf.fitting.data",
    "LabelledData": "smtm_tf.fitting.data",
    "load_data": "smtm_tf.fitting.data",
    "load_fashion_mnist": "smtm_tf.fitting.data",
    "Centres": "smtm_tf.fitting.encoders",
    "Pooling": "smtm_tf.fitting.encoders",
    "MemoryFileError": "smtm_tf.fitting.memory",
    "SemanticMemory": "smtm_tf.fitting.memory",
    "fit_semantic_memory": "smtm_tf.fitting.memory",
    "StagePlan": "smtm_tf.fitting.stages",
    "StagePlanError": "smtm_tf.fitting.stages",
    "plan_stages": "smtm_tf.fitting.stages",
    "split_model": "smtm_tf.fitting.stages",
    "Stream": "smtm_tf.fitting.streams",
    "StreamKind": "smtm_tf.fitting.streams",
    "make_stream": "smtm_tf.fitting.streams",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'smtm_tf' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
