"""Trains the benchmark's Fashion-MNIST models and fits their semantic memories.

Each model is trained with shift augmentation on the train split minus its
last 10% (the held-out tail the memory and the baselines calibrate on), then
gets its semantic memory (`<model>.smtm.npz`) and the early-exit baselines'
heads (`<model>.baselines.npz`), written beside it, so the benchmark never
trains anything.

Example:
  python scripts/train_models.py --models=vgg,mobilenet_v2
  python scripts/train_models.py --models=resnet --steps=baselines
  python scripts/train_models.py --steps=calibrate   # new exit rule, same encoders
"""

from scripts import command_line  # First: quiets native logs before TensorFlow loads.

import os
import time

from absl import app
from absl import flags

from smtm_tf.fitting import data as data_lib
from smtm_tf.fitting import kerascompat
from smtm_tf.fitting import models
from smtm_tf.evaluation import baselines
from smtm_tf.fitting import memory as memory_lib
from smtm_tf.runtime import cache as cache_lib

MODELS = models.BENCHMARK_MODELS
STEPS = ("train", "memory", "calibrate", "baselines")

_MODELS = flags.DEFINE_list("models", ["vgg", "mobilenet_v2"],
                            f"Models to make, of {sorted(MODELS)}.")
_STEPS = flags.DEFINE_list("steps", list(STEPS),
                           f"Steps to run, of {list(STEPS)}; later steps load what "
                           "earlier ones wrote.")
_DIR = flags.DEFINE_string("dir", "models", "Where the models and their files go.")
_EPOCHS = flags.DEFINE_integer("epochs", 5, "Training epochs.")
_HOLDOUT = flags.DEFINE_float("holdout", 0.1, "Held-out tail of the train split.")
_SEED = flags.DEFINE_integer("seed", 0, "Random seed.")


def main(argv):
    del argv

    unknown = [m for m in _MODELS.value if m not in MODELS]
    unknown += [s for s in _STEPS.value if s not in STEPS]
    if unknown:
        raise app.UsageError(f"Unknown models or steps {unknown}.")
    data = data_lib.load_fashion_mnist()
    (x_fit, y_fit), (x_cal, y_cal) = data.holdout(_HOLDOUT.value)
    for name in _MODELS.value:
        build, stem, num_stages = MODELS[name]
        path = os.path.join(_DIR.value, stem + ".keras")
        t0 = time.time()
        if "train" in _STEPS.value:
            print(f"[{name}] training {_EPOCHS.value} epochs", flush=True)
            model = models.train_classifier(build(), x_fit, y_fit, x_cal, y_cal,
                                            epochs=_EPOCHS.value, seed=_SEED.value)
            models.save_model_atomic(model, path)
        else:
            model = kerascompat.load_model(path)
        acc = float((model.predict(data.x_test, verbose=0, batch_size=512).argmax(1)
                     == data.y_test).mean())
        print(f"[{name}] {path}: test accuracy {100 * acc:.2f}% "
              f"({model.count_params()} parameters)", flush=True)
        memory_path = os.path.join(_DIR.value, stem + ".smtm.npz")
        if "memory" in _STEPS.value:
            print(f"[{name}] fitting the semantic memory ({num_stages} stages)", flush=True)
            memory = memory_lib.fit_semantic_memory(
                model, x_fit, x_cal, class_names=data.class_names, num_stages=num_stages,
                seed=_SEED.value)
            memory.save(memory_path)
            print(f"[{name}] {memory_path}: stages {memory.plan.cut_layers}, "
                  f"nearest-centre agreement "
                  f"{[round(100 * a, 1) for a in memory.stage_accuracy]}", flush=True)
        if "calibrate" in _STEPS.value and "memory" not in _STEPS.value:
            # Keep the encoders, calibrate every level of the (adaptive)
            # memory anew with the library's current default policy.
            memory = memory_lib.SemanticMemory.load(memory_path)
            print(f"[{name}] recalibrating the memory's exit rule", flush=True)
            memory = memory_lib.recalibrate(model, memory, x_cal,
                                            memory.exit_rule.target_agreement,
                                            cache_lib.CachePolicy(), seed=_SEED.value)
            memory.save(memory_path)
            print(f"[{name}] {memory_path}: thresholds {memory.exit_rule.thresholds}",
                  flush=True)
        if "baselines" in _STEPS.value:
            memory = memory_lib.SemanticMemory.load(memory_path)
            print(f"[{name}] training the baseline heads", flush=True)
            heads = baselines.train_baselines(model, memory.plan, x_fit, y_fit,
                                              pooling=memory.pooling, seed=_SEED.value)
            heads_path = os.path.join(_DIR.value, stem + ".baselines.npz")
            heads.save(heads_path)
            print(f"[{name}] {heads_path}: " + heads.summary(), flush=True)
        print(f"[{name}] done in {time.time() - t0:.0f} s", flush=True)


def run():
    command_line.run(main)


if __name__ == "__main__":
    run()
