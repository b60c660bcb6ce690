"""Tests for smtm_tf.fitting.callbacks.SemanticMemoryCallback in Keras 3 and tf_keras fit."""

import os
from unittest import mock

from absl.testing import absltest
from absl.testing import parameterized
import numpy as np

from smtm_tf.fitting import callbacks
from smtm_tf.fitting import memory as memory_lib
from smtm_tf.fitting import stages
import testing_utils as tu


class SemanticMemoryCallbackTest(parameterized.TestCase):

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.x, cls.y = tu.stripes(400, seed=40)
        cls.xc, _ = tu.stripes(120, seed=41)

    def _fit(self, flavour, callback, epochs=1):
        k = tu.keras_module(flavour)
        k.utils.set_random_seed(0)
        model = tu.residual_cnn(k)
        model.compile(optimizer=k.optimizers.Adam(3e-3),
                      loss="sparse_categorical_crossentropy")
        model.fit(self.x, self.y, epochs=epochs, batch_size=64, verbose=0,
                  callbacks=[callback])
        return model

    @parameterized.named_parameters(("keras3", "keras"), ("tf_keras", "tf_keras"))
    def test_fit_leaves_memory_and_writes_the_file(self, flavour):
        directory = self.create_tempdir().full_path
        path = os.path.join(directory, "model.smtm.npz")
        callback = callbacks.SemanticMemoryCallback(
            self.x, self.xc, class_names=tu.CLASS_NAMES, num_stages=2, embedding_dim=4,
            target_agreement=0.9, output_path=path)
        self.assertIsNone(callback.memory)
        model = self._fit(flavour, callback)
        mem = callback.memory
        self.assertIsInstance(mem, memory_lib.SemanticMemory)
        self.assertEqual(mem.plan, stages.plan_stages(model, num_stages=2))
        self.assertEqual(mem.class_names, tu.CLASS_NAMES)
        self.assertEqual(mem.embedding_dims, (4, 4))
        self.assertEqual(mem.exit_rule.target_agreement, 0.9)
        self.assertEqual(os.listdir(directory), ["model.smtm.npz"])
        loaded = memory_lib.SemanticMemory.load(path)
        self.assertEqual(loaded.plan, mem.plan)
        self.assertEqual(loaded.exit_rule, mem.exit_rule)
        for a, b in zip(loaded.centres, mem.centres):
            np.testing.assert_array_equal(a, b)

    def test_fitted_on_the_trained_weights(self):
        # The memory is fitted when training ends, on the final model: its
        # last-stage nearest centres agree with that model's predictions.
        callback = callbacks.SemanticMemoryCallback(self.x, self.xc, num_stages=2,
                                                    embedding_dim=4)
        self._fit("keras", callback, epochs=3)
        self.assertGreater(callback.memory.stage_accuracy[-1], 0.8)

    def test_every_n_epochs(self):
        calls = []
        real = memory_lib.fit_semantic_memory

        def spy(model, *args, **kwargs):
            calls.append(model)
            return real(model, *args, **kwargs)

        callback = callbacks.SemanticMemoryCallback(self.x[:128], self.xc[:32], num_stages=1,
                                                    embedding_dim=2, every_n_epochs=2)
        with mock.patch.object(callbacks.memory_lib, "fit_semantic_memory", side_effect=spy):
            model = self._fit("tf_keras", callback, epochs=4)
        # Epochs 2 and 4, then the end of training.
        self.assertLen(calls, 3)
        self.assertTrue(all(m is model for m in calls))
        self.assertIsNotNone(callback.memory)

    def test_invalid_arguments(self):
        with self.assertRaisesRegex(ValueError, "every_n_epochs must be >= 0"):
            callbacks.SemanticMemoryCallback(self.x, self.xc, every_n_epochs=-1)
        for bad in (0.0, 1.5):
            with self.assertRaisesRegex(ValueError, "target_agreement must be in"):
                callbacks.SemanticMemoryCallback(self.x, self.xc, target_agreement=bad)
        with self.assertRaises(ValueError):
            callbacks.SemanticMemoryCallback(self.x, self.xc, pooling="median")


if __name__ == "__main__":
    absltest.main()
