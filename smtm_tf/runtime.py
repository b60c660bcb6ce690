"""The reference host runtime: runs an SMTM .tflite frame by frame.

For each frame it runs stage 0, 1, ... and after each stage applies the
descriptor's cache-lookup operator to the stage's similarities: it scores
them with the exit metric, takes the hot or cold threshold depending on
whether the top-1 class is in the cache of hot classes, and when the score
passes returns that class; else it goes on, and after the last stage it runs
the head. Each stage compares with the centres of ALL classes (the whole
memory), so a frame of any class is judged against every class; the cache
only relaxes the rule for its classes. Answers then update the cache.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from converters import metadata
from smtm_tf import cache as cache_lib
from smtm_tf import descriptor as desc
from smtm_tf import exit_policy


class ModelFileError(ValueError):
    """Raised when a file is not an SMTM .tflite."""


def read_descriptor(model_content: bytes) -> desc.Descriptor:
    """Reads the descriptor embedded in an SMTM .tflite."""
    try:
        raw = metadata.read_metadata(model_content, desc.METADATA_NAME)
    except Exception as e:  # pylint: disable=broad-except
        raise ModelFileError(f"Not a .tflite flatbuffer ({type(e).__name__}: {e}).") from e
    if raw is None:
        raise ModelFileError(
            f"The model has no '{desc.METADATA_NAME}' metadata: it is a plain .tflite, "
            "not one made by smtm_tf's converter. Convert it with scripts/convert.py.")
    return desc.Descriptor.from_json(raw)


@dataclasses.dataclass(frozen=True)
class FrameResult:
    class_id: int
    exit_stage: int  # Stage index, or num_stages when the head ran.


class SmtmRuntime:
    """Runs an SMTM model on a backend (CPU by default).

    Args:
      model_content: the .tflite bytes.
      backend: a backend from `delegates` (default: CPU, XNNPACK, 1 thread).
    """

    def __init__(self, model_content: bytes, backend=None):
        if backend is None:
            from delegates import cpu  # pylint: disable=import-outside-toplevel
            backend = cpu.CpuBackend(num_threads=1)
        self.descriptor = read_descriptor(model_content)
        self.session = backend.load(model_content)
        missing = [s.signature.key for s in self.descriptor.stages
                   if s.signature.key not in self.session.signature_keys]
        missing += [k for k in (self.descriptor.head.key, self.descriptor.full.key)
                    if k not in self.session.signature_keys]
        if missing:
            raise ModelFileError(f"The model lacks the signatures {missing} its descriptor names.")
        self._stages = [self.session.signature(s.signature.key) for s in self.descriptor.stages]
        self._head = self.session.signature(self.descriptor.head.key)
        self._full = self.session.signature(self.descriptor.full.key)
        self.num_stages = len(self._stages)
        self._input_shape = self.descriptor.full.inputs[0].shape
        # Graph inputs keep their values between invocations, so the centres
        # are copied in once here, not per frame.
        for stage, spec in zip(self._stages, self.descriptor.stages):
            stage.set_input("centres", np.ascontiguousarray(spec.centres, np.float32))
        self._head_in = self._head.input_view("activation")
        self._head_out = self._head.output_view("probabilities")
        self._full_in = self._full.input_view("image")
        self._full_out = self._full.output_view("probabilities")
        self.set_exit_rule(self.descriptor.exit_rule, self.descriptor.cache)

    def set_exit_rule(self, rule: exit_policy.ExitRule,
                      cache_policy: cache_lib.CachePolicy | None = None) -> None:
        """Switches to another exit rule (and cache policy); empties the cache.

        The descriptor's rule is the one calibrated for the model; other rules
        serve comparisons on the same loaded model.
        """
        if rule.num_stages != self.num_stages:
            raise ValueError(f"The rule has {rule.num_stages} stages, the model "
                             f"{self.num_stages}.")
        if rule.uses_cache and cache_policy is None:
            raise ValueError("A rule with cold thresholds needs a cache policy.")
        self.rule = rule
        policy = cache_policy if rule.uses_cache else None
        self.cache = cache_lib.HotSet(policy or cache_lib.CachePolicy(max_hot=0),
                                      self.descriptor.num_classes)
        self._use_cache = policy is not None and policy.max_hot > 0
        # Per stage: (invoke, activation input, similarities, next activation,
        # hot threshold, cold threshold, metric parameters), bound once so the
        # per-frame loop does no lookups or allocations. inf never passes.
        inf = float("inf")
        self._plan = []
        for s, st in enumerate(self._stages):
            hot_t, cold_t = rule.threshold_for(s, True), rule.threshold_for(s, False)
            self._plan.append((
                st.invoke, st.input_view("activation"), st.output_view("similarities"),
                st.output_view("next_activation"), inf if hot_t is None else hot_t,
                inf if cold_t is None else cold_t, rule.stage_params(s),
                hot_t is None and cold_t is None))

    def reset_cache(self) -> None:
        """Empties the cache of hot classes (e.g. before a new stream)."""
        self.cache.reset()

    @property
    def stage_invokes(self) -> list:
        """The bare invoke of each stage signature (for overhead measurements)."""
        return [p[0] for p in self._plan]

    @property
    def head_invoke(self):
        return self._head.invoke

    @classmethod
    def from_file(cls, path: str, backend=None) -> "SmtmRuntime":
        with open(path, "rb") as f:
            return cls(f.read(), backend)

    def _frame(self, frame: np.ndarray) -> np.ndarray:
        frame = np.asarray(frame, np.float32)
        if frame.shape != self._input_shape:
            frame = frame.reshape(self._input_shape)
        return frame

    def classify(self, frame: np.ndarray) -> FrameResult:
        """Classifies one frame `[1, H, W, C]` (or `[H, W, C]`) with early exits."""
        return FrameResult(*self.classify_fast(self._frame(frame)))

    def classify_fast(self, frame: np.ndarray) -> tuple[int, int]:
        """`classify` for a float32 frame already shaped `[1, H, W, C]`.

        Returns:
          (class_id, exit_stage).
        """
        activation = frame
        score, metric = exit_policy.score, self.rule.metric
        hot = self.cache.hot
        copyto = np.copyto
        for s, (invoke, act_in, sims, next_act, hot_t, cold_t, params,
                never) in enumerate(self._plan):
            copyto(act_in, activation)
            invoke()
            if not never:
                top1, value = score(metric, sims, params)
                if value >= (hot_t if hot[top1] else cold_t):
                    top1 = int(top1)
                    if self._use_cache:
                        self.cache.update(top1, confirmed=False)
                    return top1, s
            activation = next_act
        copyto(self._head_in, activation)
        self._head.invoke()
        answer = int(self._head_out.argmax())
        if self._use_cache:
            self.cache.update(answer, confirmed=True)
        return answer, self.num_stages

    def classify_full(self, frame: np.ndarray) -> int:
        """Runs the `full` signature on a float32 `[1, H, W, C]` frame."""
        np.copyto(self._full_in, frame)
        self._full.invoke()
        return int(self._full_out.argmax())

    def stage_similarities(self, frame: np.ndarray) -> list[np.ndarray]:
        """Similarities to all centres at every stage (no exits), for analysis."""
        activation = self._frame(frame)
        out = []
        for stage in self._stages:
            stage.set_input("activation", activation)
            stage.invoke()
            out.append(stage.output("similarities"))
            activation = stage.output("next_activation")
        return out
