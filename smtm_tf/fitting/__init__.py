"""The fitting layer: data, stage planning, encoders, the semantic memory and
its calibration, the Keras callback, model builders. Uses Keras / TensorFlow
and the runtime layer below it."""
