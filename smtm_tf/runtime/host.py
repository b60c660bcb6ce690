"""The reference host runtime: runs an SMTM .tflite frame by frame.

For each frame it runs stage 0, 1, ... and after each stage applies the
descriptor's cache-lookup operator to the stage's similarities: it scores
them with the exit metric, takes the hot or cold threshold depending on
whether the top-1 class is in the cache of hot classes, and when the score
passes returns that class; else it goes on, and after the last stage it runs
the head. Each stage compares with the centres of ALL classes (the whole
memory), so a frame of any class is judged against every class; the cache
only relaxes the rule for its classes. Answers then update the cache.

Frames are camera pixels: the descriptor's preprocessing (`pixel * scale +
offset`, per channel) is applied as a frame enters stage 0 or `full`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging

import numpy as np

from smtm_tf.runtime import metadata
from smtm_tf.runtime import cache as cache_lib
from smtm_tf.runtime import descriptor as desc
from smtm_tf.runtime import exit_policy
from smtm_tf.runtime import io_utils
from delegates import cpu

STATE_FORMAT_VERSION = 2


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
        self.preprocessing = self.descriptor.preprocessing
        self._feed = self._make_feed(self.preprocessing, tuple(self._input_shape))
        self.set_exit_rule(self.descriptor.exit_rule, self.descriptor.cache)

    @staticmethod
    def _make_feed(preprocessing, shape):
        """dst <- preprocess(frame), written into a graph input without allocating."""
        if preprocessing.is_identity:
            return np.copyto
        scale, offset = preprocessing.arrays(shape[-1])
        if len(set(scale.tolist())) == 1 and len(set(offset.tolist())) == 1:
            scale, offset = np.float32(scale[0]), np.float32(offset[0])
        else:
            # Whole-frame arrays: broadcasting a [C] vector makes numpy loop
            # C elements at a time (30 us for a 32x32x3 frame, 2 us this way).
            scale = np.ascontiguousarray(np.broadcast_to(scale, shape))
            offset = np.ascontiguousarray(np.broadcast_to(offset, shape))
        multiply, add = np.multiply, np.add

        def feed(dst, frame):
            if frame.shape != dst.shape:
                frame = frame.reshape(dst.shape)
            multiply(frame, scale, out=dst)
            add(dst, offset, out=dst)
        return feed

    def set_exit_rule(self, rule: exit_policy.ExitRule,
                      cache_policy: cache_lib.CachePolicy | None = None) -> None:
        """Switches to another exit rule (and cache policy); starts a fresh memory.

        The descriptor's rule is the one calibrated for the model; other rules
        serve comparisons on the same loaded model.
        """
        if rule.num_stages != self.num_stages:
            raise ValueError(f"The rule has {rule.num_stages} stages, the model "
                             f"{self.num_stages}.")
        if rule.uses_cache and cache_policy is None:
            raise ValueError("A rule with cold thresholds needs a cache policy.")
        self.rule = rule
        self.cache_policy = cache_policy if rule.uses_cache else None
        self.memory = cache_lib.MemoryState(
            self.cache_policy, rule, [spec.centres for spec in self.descriptor.stages])
        self._write_centres()
        # Per stage: (invoke, activation input, similarities, semantic vector,
        # next activation, never exits), bound once so the per-frame loop does
        # no lookups or allocations.
        self._plan = []
        for s, st in enumerate(self._stages):
            self._plan.append((
                st.invoke, st.input_view("activation"), st.output_view("similarities"),
                st.output_view("semantic"), st.output_view("next_activation"),
                self.memory.never[s]))
        # Each stage's `semantic` output keeps the frame's vector until that
        # stage runs again, so the memory reads them there, uncopied.
        self._semantics = [p[3] for p in self._plan]

    def _write_centres(self, class_id: int | None = None) -> None:
        """Copies the memory's current centres (all, or one class's) into the stages."""
        for s, stage in enumerate(self._stages):
            if class_id is None:
                stage.set_input("centres", self.memory.centres[s])
            else:
                stage.input_view("centres")[class_id] = self.memory.centres[s, class_id]

    def reset_cache(self) -> None:
        """Forgets the stream (cache, short-term tier, adapted centres)."""
        self.memory.reset()
        self._write_centres()

    def save_state(self, path: str) -> None:
        """Writes the adaptive memory's state (cache, scores, short-term tier,
        adapted centres) to `path` atomically, so an app restart keeps it."""
        arrays = {f"state_{k}": v for k, v in self.memory.to_arrays().items()}
        arrays["meta"] = np.array(json.dumps({
            "format_version": STATE_FORMAT_VERSION, "model": self._fingerprint()}))
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        io_utils.write_bytes_atomic(path, buf.getvalue())

    def load_state(self, path: str) -> bool:
        """Restores a state written by `save_state`.

        A missing, corrupted or mismatched file (another model, rule or
        policy, another format) is reported with a warning and replaced by a
        fresh memory: the runtime never crashes on it and never uses it.

        Returns:
          True if the state was restored, False if the memory starts fresh.
        """
        try:
            with np.load(path, allow_pickle=False) as f:
                arrays = {k: f[k] for k in f.files}
            meta = json.loads(str(arrays.pop("meta")))
            if meta.get("format_version") != STATE_FORMAT_VERSION:
                raise ValueError(f"state format {meta.get('format_version')!r}, this "
                                 f"runtime reads {STATE_FORMAT_VERSION}")
            if meta.get("model") != self._fingerprint():
                raise ValueError("it was saved for another model, exit rule or cache policy")
            self.memory.from_arrays({k[len("state_"):]: v for k, v in arrays.items()
                                     if k.startswith("state_")})
        except Exception as e:  # pylint: disable=broad-except
            # Whatever is wrong with the file, a fresh memory is safe.
            logging.warning("Ignoring the memory state %s (%s: %s); starting with a fresh "
                            "cache.", path, type(e).__name__, e)
            self.reset_cache()
            return False
        self._write_centres()
        return True

    def _fingerprint(self) -> str:
        """Identifies what a saved state is valid for: the descriptor, rule and policy."""
        text = json.dumps([self.descriptor.to_dict(), self.rule.to_dict(),
                           None if self.cache_policy is None else self.cache_policy.to_dict()],
                          sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()

    @property
    def cache(self) -> cache_lib.MemoryState:
        """The adaptive memory's state (hot classes in `.hot`)."""
        return self.memory

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
          (class_id, exit_stage). A verified exit that the full model
          contradicts returns the full model's class (at its exit stage).
        """
        activation = None
        memory = self.memory
        decide = memory.decide
        copyto = np.copyto
        semantics = self._semantics
        for s, (invoke, act_in, sims, semantic, next_act, never) in enumerate(self._plan):
            if activation is None:
                self._feed(act_in, frame)
            else:
                copyto(act_in, activation)
            invoke()
            if never:
                activation = next_act
                continue
            answer = decide(s, sims, semantic)
            if answer >= 0:
                confirmed = False
                if memory.verify_due():
                    full = self.classify_full(frame)
                    adapted = memory.adapted[answer]
                    memory.verified(answer, full)
                    if full != answer:
                        if adapted and not memory.adapted[answer]:
                            self._write_centres(answer)  # Reverted.
                        answer, confirmed = full, True
                memory.record(answer, confirmed, semantics, s + 1,
                              float(self._full_out.max()) if confirmed else 1.0)
                return answer, s
            activation = next_act
        copyto(self._head_in, activation)
        self._head.invoke()
        answer = int(self._head_out.argmax())
        adapting = memory.adapting and memory.hot[answer]
        memory.record(answer, True, semantics, self.num_stages, float(self._head_out.max()))
        if adapting:
            self._write_centres(answer)
        return answer, self.num_stages

    def classify_full(self, frame: np.ndarray) -> int:
        """Runs the `full` signature on a float32 `[1, H, W, C]` frame of pixels."""
        self._feed(self._full_in, frame)
        self._full.invoke()
        return int(self._full_out.argmax())

    def stage_similarities(self, frame: np.ndarray) -> list[np.ndarray]:
        """Similarities to all centres at every stage (no exits), for analysis."""
        activation = self.preprocessing.apply(self._frame(frame))
        out = []
        for stage in self._stages:
            stage.set_input("activation", activation)
            stage.invoke()
            out.append(stage.output("similarities"))
            activation = stage.output("next_activation")
        return out
