"""The semantic memory of a model: stage plan, encoders, class centres, exit rule.

`fit_semantic_memory` builds it for a trained Keras classifier; it saves to a
single `.npz` file (written atomically) that the converter reads.

A memory file is a cache of an expensive fit, so it carries a key
(`MemoryKey`): fingerprints of the model's weights, of the preprocessing and
of the images it was fitted and calibrated on. `mismatches` says why a file
does not fit a conversion; such a file is never used.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging

import numpy as np

from smtm_tf.runtime import cache as cache_lib
from smtm_tf.fitting import calibration
from smtm_tf.fitting import encoders as enc
from smtm_tf.runtime import exit_policy
from smtm_tf.fitting import streams as streams_lib
from smtm_tf.runtime import io_utils
from smtm_tf.runtime import preprocessing as prep
from smtm_tf.fitting import stages as stages_lib

# Version 2 adds the key and the per-class frame counts; version 3 the
# encoders' optional hidden layers (an older reader would apply their second
# kernel to the pooled features). Versions 1 and 2 still load.
MEMORY_FORMAT_VERSION = 3
# Layer-aware (intercept, slope) of a class that must never exit: a score of
# -100 whatever the margin, where thresholds are log-odds of a few units.
NO_EXIT_PARAMS = (-100.0, 0.0)
# Hidden ReLU units of each stage's encoder by default (0: a linear projection).
ENCODER_HIDDEN = 128
# How stage feature maps are pooled before the encoders by default: the grid
# of quadrant means and the global max. On the seven trained zoo models it
# raised the video compute speed-up on six (1.83-4.32x with avg_max, 2.10-4.66x
# with grid; docs/model_zoo.md).
POOLING = enc.Pooling.GRID


class MemoryFileError(ValueError):
    """Raised when a semantic memory file is unreadable or of another version."""


def fingerprint_model(model) -> str:
    """SHA-256 of a Keras model's weights (names, shapes and values, in order)."""
    h = hashlib.sha256()
    for w in model.weights:
        value = np.ascontiguousarray(np.asarray(w), np.float32)
        h.update(f"{w.name}:{value.shape};".encode())
        h.update(value.tobytes())
    return h.hexdigest()


def fingerprint_arrays(*arrays: np.ndarray) -> str:
    """SHA-256 of float32 arrays (shapes and values), e.g. the images a memory saw."""
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a, np.float32)
        h.update(f"{a.shape};".encode())
        h.update(a.tobytes())
    return h.hexdigest()


@dataclasses.dataclass(frozen=True)
class MemoryKey:
    """What a fitted memory is valid for.

    Attributes:
      model: `fingerprint_model` of the classifier it was fitted to.
      preprocessing: the model's preprocessing (`Preprocessing.to_dict()`),
        or None when not known (a memory fitted by the callback on the
        user's own, already preprocessed arrays).
      data: `fingerprint_arrays` of the fitting and calibration images, or
        None when not known (the callback).
      calibration: None for the standard calibration streams, CAMERA when
        camera streams were added (`recalibrate`'s `camera_calibration`).
    """

    model: str
    preprocessing: dict | None = None
    data: str | None = None
    calibration: str | None = None

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        if d["calibration"] is None:  # As files written before the option.
            del d["calibration"]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "MemoryKey":
        required = {"model", "preprocessing", "data"}
        if not isinstance(d, dict) or not required <= set(d) <= required | {"calibration"} \
                or d.get("calibration") not in (None, CAMERA):
            raise MemoryFileError(f"Malformed memory key {d!r}.")
        return cls(**d)


# MemoryKey.calibration of a memory calibrated on camera streams too.
CAMERA = "camera"


@dataclasses.dataclass(frozen=True)
class SemanticMemory:
    """Everything SMTM adds to a trained classifier.

    Attributes:
      plan: where the stages end.
      pooling: how stage feature maps are pooled before the encoders.
      encoders: one trained projection per stage.
      centres: one `[C, D]` array of unit class centres per stage.
      exit_rule: the calibrated exit rule.
      class_names: one name per class.
      stage_accuracy: nearest-centre agreement with the full model per stage,
        measured on the calibration frames (for reports).
      cache_policy: the hot-class cache the exit rule was calibrated with, or
        None for a rule without a cache.
      key: what the memory is valid for (None: not recorded, never reused).
      class_frames: per class, the fitting frames the model assigned to it.
        A class with none has a zero centre and cannot exit.
    """

    plan: stages_lib.StagePlan
    pooling: enc.Pooling
    encoders: tuple[enc.Encoder, ...]
    centres: tuple[np.ndarray, ...]
    exit_rule: exit_policy.ExitRule
    class_names: tuple[str, ...]
    stage_accuracy: tuple[float, ...] = ()
    cache_policy: cache_lib.CachePolicy | None = None
    key: MemoryKey | None = None
    class_frames: tuple[int, ...] = ()

    @property
    def missing_classes(self) -> tuple[int, ...]:
        """Classes no fitting frame was assigned to: they cannot exit."""
        return tuple(c for c, n in enumerate(self.class_frames) if n == 0)

    def mismatches(self, key: MemoryKey, num_stages: int | None = None,
                   cut_layers=None, embedding_dim: int | None = None,
                   encoder_hidden: int | None = None, pooling=None,
                   target_agreement: float | None = None, metric=None,
                   cache: bool | None = None) -> list[str]:
        """Why this memory does not fit a conversion (empty when it does).

        `key` is the conversion's; the other arguments are what the user
        asked for (None: no preference, the memory's own choice is kept).
        """
        why = []
        if self.key is None:
            return ["it records no key (written by an older smtm_tf)"]
        if self.key.model != key.model:
            why.append("it was fitted to other model weights")
        if self.key.preprocessing is not None and key.preprocessing is not None \
                and self.key.preprocessing != key.preprocessing:
            why.append(f"it was fitted with preprocessing {self.key.preprocessing}, not "
                       f"{key.preprocessing}")
        if self.key.data is not None and key.data is not None and self.key.data != key.data:
            why.append("it was fitted on other data (or another --holdout)")
        if self.key.calibration != key.calibration:
            named = {None: "the standard streams", CAMERA: "camera streams too"}
            why.append(f"its exits were calibrated on {named[self.key.calibration]}, not "
                       f"{named[key.calibration]}")
        if cut_layers and tuple(cut_layers) != self.plan.cut_layers:
            why.append(f"its stages end at {list(self.plan.cut_layers)}, not {list(cut_layers)}")
        elif num_stages is not None and not cut_layers and num_stages != self.plan.num_stages:
            why.append(f"it has {self.plan.num_stages} stages, not {num_stages}")
        if embedding_dim is not None and any(d != embedding_dim for d in self.embedding_dims):
            why.append(f"its semantic vectors have {self.embedding_dims[0]} dimensions, not "
                       f"{embedding_dim}")
        if encoder_hidden is not None and any(e.hidden_units != encoder_hidden
                                              for e in self.encoders):
            why.append(f"its encoders have {self.encoders[0].hidden_units} hidden units, not "
                       f"{encoder_hidden}")
        if pooling is not None and enc.Pooling(pooling) is not self.pooling:
            why.append(f"its stage features are pooled {self.pooling.value}, not "
                       f"{enc.Pooling(pooling).value}")
        if target_agreement is not None and abs(
                self.exit_rule.target_agreement - target_agreement) > 1e-9:
            why.append(f"its exits were calibrated for {100 * self.exit_rule.target_agreement:.2f}%"
                       f" agreement, not {100 * target_agreement:.2f}%")
        if metric is not None and exit_policy.Metric(metric) is not self.exit_rule.metric:
            why.append(f"its metric is {self.exit_rule.metric.value}, not "
                       f"{exit_policy.Metric(metric).value}")
        if cache is not None and cache != self.exit_rule.uses_cache:
            why.append("its rule was calibrated " + ("without" if cache else "with")
                       + " a cache of hot classes")
        return why

    def __post_init__(self):
        n = self.plan.num_stages
        for field in ("encoders", "centres"):
            if len(getattr(self, field)) != n:
                raise ValueError(
                    f"{field} has {len(getattr(self, field))} entries for {n} stages.")
        if len(self.exit_rule.thresholds) != n:
            raise ValueError(
                f"exit_rule has {len(self.exit_rule.thresholds)} thresholds for {n} stages.")
        for s, (e, c) in enumerate(zip(self.encoders, self.centres)):
            if c.shape != (len(self.class_names), e.dim):
                raise ValueError(
                    f"centres[{s}] has shape {c.shape}, expected "
                    f"({len(self.class_names)}, {e.dim}).")

    @property
    def embedding_dims(self) -> tuple[int, ...]:
        return tuple(e.dim for e in self.encoders)

    def similarities(self, features: enc.StageFeatures) -> list[np.ndarray]:
        """Similarities `[N, C]` of each stage's semantic vectors to all centres."""
        return [e.encode(p) @ c.T for e, p, c in zip(self.encoders, features.pooled,
                                                     self.centres)]

    def semantics(self, features: enc.StageFeatures) -> np.ndarray:
        """Semantic vectors `[S, N, D]` of each stage."""
        return np.stack([e.encode(p) for e, p in zip(self.encoders, features.pooled)])

    def save(self, path: str) -> None:
        """Writes the memory to `path` (.npz) atomically."""
        meta = {
            "format_version": MEMORY_FORMAT_VERSION,
            "plan": self.plan.to_dict(),
            "pooling": self.pooling.value,
            "exit_rule": self.exit_rule.to_dict(),
            "class_names": list(self.class_names),
            "stage_accuracy": list(self.stage_accuracy),
            "cache_policy": None if self.cache_policy is None else self.cache_policy.to_dict(),
            "key": None if self.key is None else self.key.to_dict(),
            "class_frames": [int(n) for n in self.class_frames],
        }
        arrays = {"meta": np.array(json.dumps(meta))}
        for s, (e, c) in enumerate(zip(self.encoders, self.centres)):
            arrays[f"kernel_{s}"], arrays[f"bias_{s}"] = e.kernel, e.bias
            if e.hidden_units:
                arrays[f"hidden_kernel_{s}"] = e.hidden_kernel
                arrays[f"hidden_bias_{s}"] = e.hidden_bias
            arrays[f"centres_{s}"] = c
        io_utils.write_npz_atomic(path, arrays)

    @classmethod
    def load(cls, path: str) -> "SemanticMemory":
        """Reads a memory file.

        Raises:
          MemoryFileError: for a missing, damaged or incomplete file, or one of
            another format version.
        """
        try:
            with np.load(path, allow_pickle=False) as f:
                arrays = {k: f[k] for k in f.files}
            meta = json.loads(str(arrays["meta"]))
            if meta.get("format_version") == 1:  # No key: loads, but is never reused.
                meta = dict(meta, format_version=2, key=None, class_frames=[])
            if meta.get("format_version") not in (2, MEMORY_FORMAT_VERSION):
                raise MemoryFileError(
                    f"{path} has memory format version {meta.get('format_version')!r}; this "
                    f"smtm_tf reads version {MEMORY_FORMAT_VERSION}. Recreate the file.")
            plan = stages_lib.StagePlan.from_dict(meta["plan"])
            n = plan.num_stages
            return cls(
                plan=plan, pooling=enc.Pooling(meta["pooling"]),
                encoders=tuple(enc.Encoder(arrays[f"kernel_{s}"], arrays[f"bias_{s}"],
                                           arrays.get(f"hidden_kernel_{s}"),
                                           arrays.get(f"hidden_bias_{s}"))
                               for s in range(n)),
                centres=tuple(arrays[f"centres_{s}"] for s in range(n)),
                exit_rule=exit_policy.ExitRule.from_dict(meta["exit_rule"]),
                class_names=tuple(meta["class_names"]),
                stage_accuracy=tuple(meta["stage_accuracy"]),
                cache_policy=(None if meta.get("cache_policy") is None
                              else cache_lib.CachePolicy.from_dict(meta["cache_policy"])),
                key=None if meta["key"] is None else MemoryKey.from_dict(meta["key"]),
                class_frames=tuple(int(n) for n in meta["class_frames"]))
        except MemoryFileError:
            raise
        except Exception as e:  # pylint: disable=broad-except
            # A damaged zip, a truncated file or a missing array: all mean the
            # file cannot be trusted, whatever the exception.
            raise MemoryFileError(
                f"{path} is not a semantic memory file ({type(e).__name__}: {e}). "
                "Recreate it with the SemanticMemoryCallback or scripts/convert.py.") from e


def calibration_streams(full_predictions: np.ndarray, num_frames: int = 3000,
                        seed: int = 0) -> list[np.ndarray]:
    """Streams to calibrate a cached rule on, from held-out frames.

    Two `video` streams (scenes of 1-3 hot classes), two `zipf` streams (a
    long tail with no scenes: the hot set is a weaker prior there), one
    `uniform` stream, so cold thresholds also face frames of classes not in
    the cache, and one `scene_change` stream (hot sets of 1-6 classes, which
    the cache's capacity must follow). Built from the full model's answers:
    no labels are needed.
    """
    kinds = [streams_lib.video(full_predictions, num_frames, seed=seed + k) for k in range(2)]
    kinds += [streams_lib.zipf(full_predictions, num_frames, exponent=e, seed=seed + 2 + k)
              for k, e in enumerate((1.2, 0.8))]
    kinds.append(streams_lib.uniform(full_predictions, num_frames, seed=seed + 4))
    kinds.append(streams_lib.scene_change(full_predictions, num_frames, seed=seed + 5))
    return [k.indices for k in kinds]


def calibrate_rule(similarities: list[np.ndarray], full_predictions: np.ndarray,
                   stage_costs, target_agreement: float = 0.99,
                   metric: exit_policy.Metric | str = exit_policy.Metric.LAYER_AWARE,
                   metric_params=None,
                   cache_policy: cache_lib.CachePolicy | None = cache_lib.CachePolicy(),
                   seed: int = 0) -> exit_policy.ExitRule:
    """Calibrates an exit rule on held-out similarities, with or without a cache.

    Without semantic vectors there is no short-term tier or centre
    adaptation to calibrate; `calibrate_memory` does all levels.
    """
    if cache_policy is None or cache_policy.max_hot == 0:
        return exit_policy.calibrate(similarities, full_predictions, stage_costs,
                                     target_agreement, metric=metric,
                                     metric_params=metric_params)
    rule, _ = calibration.calibrate_with_cache(
        None, None, full_predictions, stage_costs,
        calibration_streams(full_predictions, seed=seed), cache_policy, target_agreement,
        metric=metric, metric_params=metric_params, similarities=similarities)
    return rule


def calibrate_memory(semantics: np.ndarray, centres, full_predictions: np.ndarray,
                     stage_costs, target_agreement: float = 0.99,
                     metric: exit_policy.Metric | str = exit_policy.Metric.LAYER_AWARE,
                     metric_params=None,
                     cache_policy: cache_lib.CachePolicy = cache_lib.CachePolicy(),
                     held_semantics: np.ndarray | None = None,
                     held_full: np.ndarray | None = None, seed: int = 0,
                     full_confidence: np.ndarray | None = None,
                     held_confidence: np.ndarray | None = None,
                     camera_semantics: np.ndarray | None = None,
                     camera_full: np.ndarray | None = None,
                     camera_confidence: np.ndarray | None = None, camera_lengths=()):
    """Calibrates every level of the adaptive memory on held-out frames.

    Args:
      semantics: `[S, N, D]` semantic vectors of held-out frames.
      centres: per stage, the `[K, D]` centres.
      full_predictions: the full model's class for each frame.
      stage_costs, target_agreement, metric, metric_params: as `calibrate_rule`.
      cache_policy: the policy to calibrate.
      held_semantics, held_full: vectors and answers of held-object frames
        (`streams.held_object` rendered from held-out images), in stream
        order, for the short-term tier.
      seed: seed of the calibration streams.
      full_confidence, held_confidence: the full model's top probability for
        the held-out and held-object frames (gates the short-term tier).
      camera_semantics, camera_full, camera_confidence, camera_lengths: the
        same for frames of camera streams (`camera_streams`), in stream order,
        `camera_lengths` frames each: each is one more calibration stream
        the rule is fitted on and must meet the target on, and every
        stream's bound then allows for errors in runs.

    Returns:
      (ExitRule, CachePolicy as calibrated).
    """
    n = semantics.shape[1]
    streams = calibration_streams(full_predictions, seed=seed)
    pool, full, held = semantics, np.asarray(full_predictions), []
    confidence = None if full_confidence is None else np.asarray(full_confidence)
    if held_semantics is not None:
        pool = np.concatenate([semantics, held_semantics], axis=1)
        full = np.concatenate([full, np.asarray(held_full)])
        if confidence is not None:
            confidence = np.concatenate([confidence, np.asarray(held_confidence)])
        half = held_semantics.shape[1] // 2
        held = [n + np.arange(half), n + np.arange(half, held_semantics.shape[1])]
    if camera_semantics is not None:
        start = pool.shape[1]
        pool = np.concatenate([pool, camera_semantics], axis=1)
        full = np.concatenate([full, np.asarray(camera_full)])
        if confidence is not None:
            confidence = np.concatenate([confidence, np.asarray(camera_confidence)])
        for length in camera_lengths:
            streams.append(start + np.arange(length))
            start += length
    return calibration.calibrate_with_cache(
        pool, centres, full, stage_costs, streams, cache_policy, target_agreement,
        metric=metric, metric_params=metric_params, instance_streams=held,
        full_confidence=confidence, runs=camera_semantics is not None)


def fit_semantic_memory(model, x_train: np.ndarray, x_calibration: np.ndarray,
                        class_names: tuple[str, ...] | None = None,
                        num_stages: int | None = None, cut_layers=None,
                        embedding_dim: int = 32,
                        encoder_hidden: int = ENCODER_HIDDEN,
                        pooling: enc.Pooling | str = POOLING,
                        centres: enc.Centres | str = enc.Centres.CLASS_WEIGHTS,
                        target_agreement: float = 0.99, encoder_epochs: int = 30,
                        metric: exit_policy.Metric | str = exit_policy.Metric.LAYER_AWARE,
                        cache_policy: cache_lib.CachePolicy | None = cache_lib.CachePolicy(),
                        batch_size: int = 256, seed: int = 0,
                        key: MemoryKey | None = None, progress=None,
                        preprocessing: prep.Preprocessing | None = None,
                        camera_calibration: bool = False) -> SemanticMemory:
    """Trains encoders and centres for a trained classifier and calibrates exits.

    The encoders learn to reproduce the model's own decisions (its predicted
    classes on `x_train`), because an exit is right when it agrees with the
    model. Calibration uses `x_calibration`, which should be held out from
    encoder training.

    Args:
      model: a trained Sequential or functional Keras classifier.
      x_train: images to train the encoders and compute the centres on.
      x_calibration: held-out images to calibrate the exit rule on.
      class_names: one name per class (default: "0", "1", ...).
      num_stages: stages to plan when `cut_layers` is not given (None: as
        `stages.plan_stages`, up to DEFAULT_NUM_STAGES).
      cut_layers: explicit layer names that end each stage.
      embedding_dim: size D of the semantic vectors.
      encoder_hidden: units of a ReLU layer in each encoder before its
        projection (0: a linear projection).
      pooling: pooling before each encoder.
      centres: class weights of the cosine classifier, or class means.
      target_agreement: share of all frames whose answer must agree with the
        full model (frames that run the whole model agree): 1 - budget / 100.
      metric: the exit metric.
      cache_policy: the hot-class cache to calibrate with (None: no cache).
      encoder_epochs: epochs of encoder training.
      batch_size: batch size for feature extraction and training.
      seed: random seed.
      key: what the memory is valid for; default: the model's weights (the
        data and preprocessing are the caller's and not recorded).
      progress: called with a line of text at each step (None: silent).
      preprocessing: what was done to the pixels the images came from (as
        `recalibrate`); None: the images are pixels.
      camera_calibration: calibrate on camera streams too (`recalibrate`);
        recorded in the key.

    Returns:
      The fitted SemanticMemory. Classes the model assigns no frame of
      `x_train` to get zero centres (similarity 0 to every frame) and cannot
      exit; `memory.missing_classes` lists them.
    """
    if camera_calibration and (cache_policy is None or cache_policy.max_hot == 0):
        raise ValueError("camera_calibration calibrates the hot-class cache's exits: give a "
                         "cache_policy, or drop camera_calibration.")
    plan = stages_lib.plan_stages(model, num_stages=num_stages, cut_layers=cut_layers)
    stage_models, head = stages_lib.split_model(model, plan)
    stages_lib.check_chain(model, stage_models, head, x_calibration[:8])
    pooling = enc.Pooling(pooling)
    say = progress or (lambda _: None)
    logging.info("Stages end at %s (compute shares %s).", plan.cut_layers,
                 [round(c, 3) for c in plan.stage_costs])
    if num_stages is None and not cut_layers and (
            plan.num_stages < stages_lib.DEFAULT_NUM_STAGES):
        say(f"the model has {plan.num_stages} spatial cut point(s) where a single feature "
            f"map carries it forward: {plan.num_stages} stage(s) instead of "
            f"{stages_lib.DEFAULT_NUM_STAGES}")
    say(f"stages end at {', '.join(plan.cut_layers)} (compute shares "
        + ", ".join(f"{100 * c:.1f}%" for c in plan.stage_costs) + ")")
    say(f"extracting pooled stage features of {len(x_train)} + {len(x_calibration)} images")
    train = enc.extract_features(stage_models, head, x_train, pooling, batch_size)
    calib = enc.extract_features(stage_models, head, x_calibration, pooling, batch_size)
    num_classes = train.probabilities.shape[1]
    if class_names is None:
        class_names = tuple(str(i) for i in range(num_classes))
    if len(class_names) != num_classes:
        raise ValueError(
            f"{len(class_names)} class names for a model with {num_classes} outputs.")
    targets = train.predictions
    class_frames = np.bincount(targets, minlength=num_classes)
    if (class_frames == 0).any():
        logging.warning("%d of %d classes get no fitting frame (the model never answers "
                        "them on this data); they cannot exit.",
                        int((class_frames == 0).sum()), num_classes)
    centres_kind = enc.Centres(centres)
    encoders, centres = [], []
    for s, pooled in enumerate(train.pooled):
        e, weights = enc.train_encoder(pooled, targets, num_classes, dim=embedding_dim,
                                       hidden=encoder_hidden,
                                       epochs=encoder_epochs, batch_size=batch_size,
                                       seed=seed + s)
        encoders.append(e)
        if centres_kind is enc.Centres.CLASS_WEIGHTS:
            centres.append(np.where(class_frames[:, None] > 0, weights, 0.0).astype(np.float32))
        else:
            centres.append(enc.class_centres(e.encode(pooled), targets, num_classes))
        say(f"trained the stage {s} encoder ({s + 1}/{plan.num_stages})")
    memory = SemanticMemory(plan, pooling, tuple(encoders), tuple(centres),
                            exit_policy.ExitRule(exit_policy.Metric.MARGIN,
                                                 (None,) * plan.num_stages, 1.0),
                            tuple(class_names),
                            key=dataclasses.replace(
                                key if key is not None else MemoryKey(fingerprint_model(model)),
                                calibration=CAMERA if camera_calibration else None),
                            class_frames=tuple(int(n) for n in class_frames))
    sims = memory.similarities(calib)
    full = calib.predictions
    accuracy = tuple(float((s.argmax(axis=1) == full).mean()) for s in sims)
    metric = exit_policy.Metric(metric)
    params = None
    if metric is exit_policy.Metric.LAYER_AWARE:
        params = exit_policy.fit_layer_aware(memory.similarities(train), targets)
        # A class no fitting frame was assigned to has a zero centre; its
        # pooled fit would still let a frame exit on it (one whose
        # similarities to every other class are negative): pin its score
        # far below any threshold instead.
        missing = class_frames == 0
        params = tuple(np.where(missing[:, None], NO_EXIT_PARAMS, p).astype(np.float32)
                       for p in params)
    memory = dataclasses.replace(
        memory, stage_accuracy=accuracy,
        exit_rule=exit_policy.ExitRule(metric, (None,) * plan.num_stages, 1.0,
                                       metric_params=params))
    say("calibrating the exit rule and the adaptive memory on the held-out images")
    memory = recalibrate(model, memory, x_calibration, target_agreement, cache_policy,
                         batch_size, seed, calib, preprocessing)  # The key says which streams.
    return memory


def calibration_exit_shares(memory: SemanticMemory, features: enc.StageFeatures,
                            seed: int = 0) -> np.ndarray:
    """Per stage, then the head: the share of frames the memory's rule sends
    there on the calibration streams of `features` (`calibration_streams`),
    cache in the loop, all streams together."""
    full = features.predictions
    semantics = memory.semantics(features)
    counts = np.zeros(memory.plan.num_stages + 1)
    for frames in calibration_streams(full, seed=seed):
        seen = calibration.replay(memory.exit_rule, memory.cache_policy, semantics,
                                  memory.centres, full, frames=frames)
        counts += np.bincount(seen.exit_stage, minlength=len(counts))
    return counts / counts.sum()


def drop_unpaid_stages(model, memory: SemanticMemory, x_calibration: np.ndarray,
                       features: enc.StageFeatures, overhead: float,
                       target_agreement: float = 0.99,
                       cache_policy: cache_lib.CachePolicy | None = cache_lib.CachePolicy(),
                       batch_size: int = 256, seed: int = 0,
                       preprocessing: prep.Preprocessing | None = None,
                       say=None, prices: stages_lib.StagePlan | None = None
                       ) -> SemanticMemory:
    """The memory without the stages whose exits do not pay for their overhead.

    Where its calibrated rule exits on the calibration streams
    (`calibration_exit_shares`) decides, by `stages.stages_worth_keeping`:
    a stage that few frames leave at costs every frame that reaches it its
    encoder, a hand-over and a lookup. The kept stages keep their encoders
    and centres (they pool the same feature maps); the rule is calibrated
    anew for them, and the kept stages replace the planned ones only if that
    rule's exits, replayed the same way, cost less (`stages.expected_cost`).
    `features` are the calibration images' (`recalibrate`). `prices` is the
    memory's plan priced another way (`stages.priced_by_time`, with
    `overhead` from the same measurement); default: its multiply-adds.
    """
    say = say or (lambda _: None)
    shares = calibration_exit_shares(memory, features, seed)
    plan = memory.plan
    prices = plan if prices is None else prices
    priced = "compute" if prices is plan else "time"
    keep = stages_lib.stages_worth_keeping(shares[:-1], prices, overhead)
    if len(keep) == plan.num_stages:
        return memory
    reach = 1.0 - np.concatenate([[0.0], np.cumsum(shares[:-1])])
    for s in sorted(set(range(plan.num_stages)) - set(keep)):
        say(f"dropping stage {s} (ends at {plan.cut_layers[s]!r}): "
            f"{100 * shares[s]:.1f}% of the calibration frames exit there and "
            f"{100 * reach[s]:.1f}% reach it; its overhead ({100 * overhead:.0f}% of the "
            "model for each frame that reaches it) costs more than those exits save")
    kept = stages_lib.keep_stages(plan, keep)
    before = stages_lib.expected_cost(shares[:-1], prices, overhead)
    say(f"stages end at {', '.join(kept.cut_layers)} ({priced} shares "
        + ", ".join(f"{100 * c:.1f}%" for c in stages_lib.keep_stages(prices, keep).stage_costs)
        + f"); estimated cost per frame {100 * before:.1f} -> "
        f"{100 * stages_lib.expected_cost(shares[:-1], prices, overhead, keep):.1f}% of the "
        "model; calibrating the exit rule for them")
    rule = memory.exit_rule
    params = None if rule.metric_params is None else tuple(rule.metric_params[k] for k in keep)
    pruned = dataclasses.replace(
        memory, plan=kept, encoders=tuple(memory.encoders[k] for k in keep),
        centres=tuple(memory.centres[k] for k in keep),
        stage_accuracy=tuple(memory.stage_accuracy[k] for k in keep if memory.stage_accuracy),
        exit_rule=exit_policy.ExitRule(rule.metric, (None,) * len(keep), 1.0,
                                       metric_params=params))
    subset = enc.StageFeatures(tuple(features.pooled[k] for k in keep), features.probabilities)
    pruned = recalibrate(model, pruned, x_calibration, target_agreement, cache_policy,
                         batch_size, seed, subset, preprocessing)
    # The estimate moved a dropped stage's exits to the next kept stage; the
    # rule calibrated anew spends the budget its own way. Kept only if its
    # own exits cost less than the planned stages' did.
    after = stages_lib.expected_cost(calibration_exit_shares(pruned, subset, seed)[:-1],
                                     stages_lib.keep_stages(prices, keep), overhead)
    if after >= before:
        say(f"keeping all {plan.num_stages} stages: calibrated for the kept stages alone, "
            f"the rule's exits cost {100 * after:.1f}% of the model per frame against "
            f"{100 * before:.1f}%")
        return memory
    say(f"calibrated for them, the rule's exits cost {100 * after:.1f}% of the model per "
        f"frame (all {plan.num_stages} stages: {100 * before:.1f}%)")
    return pruned


def camera_streams(full_predictions: np.ndarray, num_frames: int = 2000,
                   seed: int = 0) -> list[streams_lib.Stream]:
    """What a handheld camera sends, from held-out frames: `camera` and `camera_pan`.

    Held objects with jitter, brightness and sensor noise (and a pan), whose
    errors come in runs; rendered (`render`), they are calibration streams
    like `calibration_streams`' (seeds apart from the benchmark's).
    """
    return [streams_lib.make_stream(kind, full_predictions, num_frames, seed=seed + 200 + k)
            for k, kind in enumerate((streams_lib.StreamKind.CAMERA,
                                      streams_lib.StreamKind.CAMERA_PAN))]


def render(stream: streams_lib.Stream, inputs: np.ndarray,
           preprocessing: prep.Preprocessing | None = None) -> np.ndarray:
    """`stream`'s frames as model inputs, from model inputs `inputs`.

    Shifts, exposure and noise act on pixels (0..255 or 0..1), so preprocessed
    inputs are brought back to their pixels, rendered, and preprocessed again.
    """
    if preprocessing is None or preprocessing.is_identity:
        return stream.render(inputs)
    return preprocessing.apply(stream.render(preprocessing.unapply(inputs)))


def recalibrate(model, memory: SemanticMemory, x_calibration: np.ndarray,
                target_agreement: float = 0.99,
                cache_policy: cache_lib.CachePolicy | None = cache_lib.CachePolicy(),
                batch_size: int = 256, seed: int = 0,
                features: enc.StageFeatures | None = None,
                preprocessing: prep.Preprocessing | None = None,
                camera_calibration: bool | None = None) -> SemanticMemory:
    """Calibrates the memory's exit rule (same metric) anew, keeping its encoders.

    With a cache, every level of the adaptive memory is calibrated, the
    short-term tier on held-object streams rendered from `x_calibration`.
    With `camera_calibration` (None: as `memory.key.calibration` says), a
    `camera` and a `camera_pan` stream rendered from `x_calibration` join the
    calibration streams, and each stream's bound allows for errors in runs
    (`calibration.stream_lower_bound`): the budget then holds on what a
    handheld camera sends, at a cost in exits.
    A camera shifts, brightens and adds noise to pixels: with `preprocessing`
    (what was done to the pixels `x_calibration` came from), those streams
    are rendered from the pixels and preprocessed again; None: `x_calibration`
    are the pixels.
    """
    stage_models, head = stages_lib.split_model(model, memory.plan)
    if features is None:
        features = enc.extract_features(stage_models, head, x_calibration, memory.pooling,
                                        batch_size)
    rule = memory.exit_rule
    costs = memory.plan.stage_costs
    full = features.predictions
    if cache_policy is None or cache_policy.max_hot == 0:
        rule = calibrate_rule(memory.similarities(features), full, costs, target_agreement,
                              rule.metric, rule.metric_params, None, seed)
        cache_policy = None
    else:
        held_sem = held_full = held_conf = None
        if cache_policy.instance_slots:
            held = [streams_lib.held_object(full, 3000, seed=seed + 100 + k) for k in range(2)]
            frames = np.concatenate([render(h, x_calibration, preprocessing) for h in held])
            held_features = enc.extract_features(stage_models, head, frames, memory.pooling,
                                                 batch_size)
            held_sem, held_full = memory.semantics(held_features), held_features.predictions
            held_conf = held_features.probabilities.max(axis=1)
        camera = {}
        if camera_calibration is None:
            camera_calibration = memory.key is not None and memory.key.calibration == CAMERA
        if camera_calibration:
            cameras = camera_streams(full, seed=seed)
            frames = np.concatenate([render(c, x_calibration, preprocessing)
                                     for c in cameras])
            seen = enc.extract_features(stage_models, head, frames, memory.pooling, batch_size)
            camera = {"camera_semantics": memory.semantics(seen),
                      "camera_full": seen.predictions,
                      "camera_confidence": seen.probabilities.max(axis=1),
                      "camera_lengths": [len(c) for c in cameras]}
        rule, cache_policy = calibrate_memory(
            memory.semantics(features), memory.centres, full, costs, target_agreement,
            rule.metric, rule.metric_params, cache_policy, held_sem, held_full, seed,
            features.probabilities.max(axis=1), held_conf, **camera)
    logging.info("%s thresholds %s (cold %s, instance %s).", rule.metric.value,
                 rule.thresholds, rule.cold_thresholds, rule.instance_thresholds)
    return dataclasses.replace(memory, exit_rule=rule,
                               cache_policy=cache_policy if rule.uses_cache else None)
