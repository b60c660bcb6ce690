"""A Keras callback that fits the semantic memory when training ends."""

from __future__ import annotations

import keras
import numpy as np

from smtm_tf.fitting import encoders as enc
from smtm_tf.fitting import memory as memory_lib


class SemanticMemoryCallback(keras.callbacks.Callback):
    """Fits SMTM's semantic memory to the model being trained.

    When `fit` ends (and, if `every_n_epochs` > 0, every that many epochs) it
    plans the stages, trains one semantic encoder per stage on the frozen
    model's features, computes the class centres and calibrates the exit rule
    on held-out images. The result is left in `self.memory` and, if
    `output_path` is set, saved there atomically (name it
    `<model>.smtm.npz` beside the saved model and `scripts/convert.py` picks it
    up).

    Works with Keras 3 and tf_keras `fit` alike.

    Example:

    ```python
    callback = smtm_tf.SemanticMemoryCallback(
        x_train, x_calibration, class_names=names, output_path="model.smtm.npz")
    model.fit(x_train, y_train, epochs=5, callbacks=[callback])
    model.save("model.keras")
    print(callback.memory.exit_rule)
    ```

    Args:
      x_train: images to train the encoders on.
      x_calibration: held-out images to calibrate the exits on.
      class_names: one name per class.
      num_stages: stages to plan when `cut_layers` is not given (None: up to
        four, fewer on a model with fewer spatial cut points).
      cut_layers: explicit layer names that end each stage.
      embedding_dim: size of the semantic vectors.
      encoder_hidden: hidden ReLU units in each encoder (0: a linear projection).
      pooling: pooling before each encoder (an `encoders.Pooling` value).
      target_agreement: share of all frames whose answer must agree with the full
        model (frames that run the whole model agree): 1 - budget / 100.
      every_n_epochs: also refit every this many epochs (0: only at the end).
      output_path: where to save the memory (.npz), or None.
    """

    def __init__(self, x_train: np.ndarray, x_calibration: np.ndarray,
                 class_names=None, num_stages: int | None = None, cut_layers=None,
                 embedding_dim: int = 32, encoder_hidden: int = memory_lib.ENCODER_HIDDEN,
                 pooling: str = memory_lib.POOLING.value,
                 target_agreement: float = 0.99, every_n_epochs: int = 0,
                 output_path: str | None = None):
        super().__init__()
        if every_n_epochs < 0:
            raise ValueError(f"every_n_epochs must be >= 0, got {every_n_epochs}.")
        if not 0.0 < target_agreement <= 1.0:
            raise ValueError(f"target_agreement must be in (0, 1], got {target_agreement}.")
        self.x_train = x_train
        self.x_calibration = x_calibration
        self.class_names = class_names
        self.num_stages = num_stages
        self.cut_layers = cut_layers
        self.embedding_dim = embedding_dim
        self.encoder_hidden = encoder_hidden
        self.pooling = enc.Pooling(pooling)
        self.target_agreement = target_agreement
        self.every_n_epochs = every_n_epochs
        self.output_path = output_path
        self.memory: memory_lib.SemanticMemory | None = None
        self._fits = 0

    # tf_keras's CallbackList asks every callback these before `fit`; Keras 3
    # callbacks lack them. With them the same callback serves both `fit`s.
    _supports_tf_logs = False

    def _implements_train_batch_hooks(self):
        return False

    def _implements_test_batch_hooks(self):
        return False

    def _implements_predict_batch_hooks(self):
        return False

    def on_train_begin(self, logs=None):
        self.memory = None
        self._fits = 0

    def on_epoch_end(self, epoch, logs=None):
        if self.every_n_epochs and (epoch + 1) % self.every_n_epochs == 0:
            self._fit()

    def on_train_end(self, logs=None):
        self._fit()

    def _fit(self):
        self.memory = memory_lib.fit_semantic_memory(
            self.model, self.x_train, self.x_calibration, class_names=self.class_names,
            num_stages=self.num_stages, cut_layers=self.cut_layers,
            embedding_dim=self.embedding_dim, encoder_hidden=self.encoder_hidden,
            pooling=self.pooling,
            target_agreement=self.target_agreement)
        self._fits += 1
        if self.output_path:
            self.memory.save(self.output_path)
