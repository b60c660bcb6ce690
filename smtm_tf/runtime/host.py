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
import json
import logging
import math
import os
import re

import numpy as np

from smtm_tf.runtime import metadata
from smtm_tf.runtime import cache as cache_lib
from smtm_tf.runtime import descriptor as desc
from smtm_tf.runtime import exit_policy
from smtm_tf.runtime import io_utils
from delegates import cpu

# 3: the state's fingerprint is the SHA-256 of the descriptor's JSON text as
# stored in the model (native runtimes compute it the same way).
STATE_FORMAT_VERSION = 3

# Every way a model file can be wrong raises this from `SmtmRuntime(...)`.
ModelFileError = desc.ModelFileError


class FrameError(ValueError):
    """Raised for a frame that cannot be classified: non-finite pixels, or a
    model output that is not finite for it. Nothing from such a frame reaches
    the adaptive memory."""


# Errors a backend or the descriptor's objects raise for a model that is not
# what its descriptor says (RuntimeError stays: it means the backend itself
# is unavailable, e.g. no GPU).
_MODEL_ERRORS = (ValueError, KeyError, IndexError, TypeError, OverflowError, RecursionError,
                 AttributeError, MemoryError)  # MemoryError: a damaged shape asks for TiBs.


def _is_model_error(e: Exception) -> bool:
    # The interpreter refuses a malformed graph with a plain RuntimeError;
    # its subclasses (GpuUnavailableError, ...) say the backend itself is
    # unavailable, and pass.
    return isinstance(e, _MODEL_ERRORS) or type(e) is RuntimeError


def read_descriptor(model_content: bytes) -> desc.Descriptor:
    """Reads the descriptor embedded in an SMTM .tflite.

    Raises:
      ModelFileError: the bytes are not an SMTM .tflite or its descriptor is
        malformed (a `DescriptorError` naming the field).
    """
    return _read_descriptor_text(model_content)[0]


def _read_descriptor_text(model_content: bytes) -> tuple[desc.Descriptor, bytes]:
    """`read_descriptor`, and the descriptor's JSON text as the model stores it."""
    try:
        raw = metadata.read_metadata(model_content, desc.METADATA_NAME)
        digest = metadata.check_digest(model_content)
    except Exception as e:  # pylint: disable=broad-except
        raise ModelFileError(f"Not a .tflite flatbuffer ({type(e).__name__}: {e}).") from e
    # Files converted before digests existed have none: they are read as before.
    if digest == "mismatch":
        raise ModelFileError(
            "The model file is damaged: its SHA-256 is not the one stored at conversion "
            f"({metadata.DIGEST_NAME}). Download or convert it again.")
    if raw is None:
        raise ModelFileError(
            f"The model has no '{desc.METADATA_NAME}' metadata: it is a plain .tflite, "
            "not one made by smtm_tf's converter. Convert it with scripts/convert.py.")
    return desc.Descriptor.from_json(raw), bytes(raw)


_STAGE_KEY = re.compile(r"stage_[0-9]+")


def check_against_graph(descriptor: desc.Descriptor, session) -> None:
    """Raises ModelFileError unless the graph has exactly the descriptor's signatures.

    The descriptor's stages are all the model's `stage_<s>` signatures, its
    head and `full` signatures exist, and each of those has exactly the inputs and outputs (names, shapes,
    dtypes) the descriptor lists, as the backend session reports them.
    """
    specs = {f"stages[{s}].signature": st.signature for s, st in enumerate(descriptor.stages)}
    specs.update(head=descriptor.head, full=descriptor.full)
    graph = sorted(session.signature_keys)
    named = sorted(spec.key for spec in specs.values())
    # Other signatures may ride along (the benchmark's baseline heads), but
    # not another stage: a descriptor that drops one would skip it.
    stages = sorted(k for k in graph if _STAGE_KEY.fullmatch(k))
    if not set(named) <= set(graph) or stages != sorted(
            st.signature.key for st in descriptor.stages):
        raise ModelFileError(f"The model's signatures are {graph}; its descriptor names "
                             f"{named}.")
    for field, spec in specs.items():
        try:
            sig = session.signature(spec.key)
        except (ValueError, KeyError) as e:
            raise ModelFileError(f"{field}: signature {spec.key!r} cannot run: {e}") from e
        for kind, details in (("inputs", sig.input_details), ("outputs", sig.output_details)):
            want = {t.name: (t.shape, t.dtype) for t in getattr(spec, kind)}
            got = {name: (tuple(int(v) for v in d["shape"]), np.dtype(d["dtype"]).name)
                   for name, d in details.items()}
            if got != want:
                raise ModelFileError(
                    f"{field}.{kind}: the descriptor lists {_tensor_list(want)}, the graph's "
                    f"signature {spec.key!r} has {_tensor_list(got)}.")


def _tensor_list(tensors: dict) -> str:
    return ", ".join(f"{n} {list(shape)} {dtype}" for n, (shape, dtype) in sorted(tensors.items()))


def check_state_path(path: str) -> None:
    """Raises OSError unless `save_state(path)` can write there; call it before a run.

    Also removes the temporary files a killed `save_state` left beside `path`.
    """
    if os.path.isdir(path):
        raise IsADirectoryError(f"The state path {path} is a directory.")
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    if not os.access(directory, os.W_OK | os.X_OK) or (
            os.path.exists(path) and not os.access(path, os.W_OK)):
        raise PermissionError(f"The state path {path} is not writable.")
    io_utils.remove_stale_temporaries(path)


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
        self.descriptor, self._descriptor_text = _read_descriptor_text(model_content)
        try:
            self.session = backend.load(model_content)
        except Exception as e:  # pylint: disable=broad-except
            if not _is_model_error(e):
                raise
            raise ModelFileError(f"The backend cannot load the model ({type(e).__name__}: "
                                 f"{e}).") from e
        try:
            check_against_graph(self.descriptor, self.session)
            self._bind()
        except ModelFileError:
            raise
        except Exception as e:  # pylint: disable=broad-except
            if not _is_model_error(e):
                raise
            raise ModelFileError(f"The model does not run as its descriptor says "
                                 f"({type(e).__name__}: {e}).") from e

    def _bind(self) -> None:
        self._stages = [self.session.signature(s.signature.key) for s in self.descriptor.stages]
        self._head = self.session.signature(self.descriptor.head.key)
        self._full = self.session.signature(self.descriptor.full.key)
        self.num_stages = len(self._stages)
        self._input_shape = self.descriptor.full.inputs[0].shape
        self._zero_frame = np.zeros(self._input_shape, np.float32)
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
        io_utils.write_npz_atomic(path, arrays)

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

    def check_state_path(self, path: str) -> None:
        """`check_state_path(path)`, as a method for apps that hold a runtime."""
        check_state_path(path)

    def _fingerprint(self) -> str:
        """Identifies what a saved state is valid for: the descriptor, rule and policy.

        With the descriptor's own rule and policy: the SHA-256 (hex) of the
        descriptor's JSON text exactly as the model stores it, which any
        runtime can compute from the file. With another rule or policy
        (`set_exit_rule`): the SHA-256 of that text, a newline, and the
        canonical JSON (sorted keys, no spaces) of `[rule, policy]`.
        """
        digest = hashlib.sha256(self._descriptor_text)
        d = self.descriptor
        own_policy = d.cache if d.exit_rule.uses_cache else None
        if not (self.rule == d.exit_rule and self.cache_policy == own_policy):
            rule = [self.rule.to_dict(),
                    None if self.cache_policy is None else self.cache_policy.to_dict()]
            digest.update(b"\n" + json.dumps(rule, sort_keys=True, separators=(",", ":")).encode())
        return digest.hexdigest()

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
        """The frame as float32 `[1, H, W, C]`; `[H, W, C]` gains the batch axis."""
        frame = np.asarray(frame, np.float32)
        if frame.shape != self._input_shape:
            if frame.shape != self._input_shape[1:]:
                raise ValueError(f"The frame has shape {frame.shape}; the model takes "
                                 f"{self._input_shape} (or {self._input_shape[1:]}).")
            frame = frame.reshape(self._input_shape)
        return frame

    def _check_frame(self, frame: np.ndarray) -> None:
        """Raises unless `frame` has the model's input shape and finite pixels.

        The dot product with zeros is NaN exactly when a pixel is NaN or
        infinite (0 * inf is NaN), and 0 for any finite frame: one BLAS call
        and no temporary. Right after a model run it costs 2.3 us on a
        32x32x3 frame against 4.1 us for `isfinite(frame).all()` (a sum
        would warn of overflow on huge finite pixels, frame after frame).
        """
        if frame.shape != self._input_shape or not math.isfinite(
                np.vdot(frame, self._zero_frame)):
            self._refuse_frame(frame)

    def _refuse_frame(self, frame: np.ndarray) -> None:
        """Raises the error that says what is wrong with a refused frame."""
        if frame.shape != self._input_shape:
            raise ValueError(f"The frame has shape {frame.shape}; the model takes "
                             f"{self._input_shape}.")
        raise FrameError(f"The frame has {int((~np.isfinite(frame)).sum())} non-finite "
                         "pixels (NaN or infinity); it was not classified.")

    def classify(self, frame: np.ndarray) -> FrameResult:
        """Classifies one frame `[1, H, W, C]` (or `[H, W, C]`) with early exits.

        Raises:
          ValueError: the frame's shape is not the model's input shape.
          FrameError: the frame has non-finite pixels, or the model's output
            for it is not finite. The memory is left as it was.
        """
        return FrameResult(*self.classify_fast(self._frame(frame)))

    def classify_fast(self, frame: np.ndarray) -> tuple[int, int]:
        """`classify` for a float32 frame already shaped `[1, H, W, C]`.

        Returns:
          (class_id, exit_stage). A verified exit that the full model
          contradicts returns the full model's class (at its exit stage).

        Raises:
          ValueError, FrameError: as `classify`.
        """
        self._check_frame(frame)
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
                    full = self._run_full(frame)
                    adapted = memory.adapted[answer]
                    memory.verified(answer, full)
                    if full != answer:
                        if adapted and not memory.adapted[answer]:
                            self._write_centres(answer)  # Reverted.
                        answer, confirmed = full, True
                memory.record(answer, confirmed, semantics, s + 1,
                              self._full_out.item(full) if confirmed else 1.0)
                return answer, s
            activation = next_act
        copyto(self._head_in, activation)
        self._head.invoke()
        # The top probability is read at the argmax (a NaN is its own argmax):
        # an argmax and an item cost a third of a max right after a model run.
        answer = int(self._head_out.argmax())
        confidence = self._head_out.item(answer)
        if not math.isfinite(confidence):  # No answer, and nothing for the memory.
            raise FrameError(f"The model's probabilities for this frame are not finite "
                             f"(top {confidence}); it was not classified.")
        adapting = memory.adapting and memory.hot[answer]
        memory.record(answer, True, semantics, self.num_stages, confidence)
        if adapting:
            self._write_centres(answer)
        return answer, self.num_stages

    def classify_full(self, frame: np.ndarray) -> int:
        """Runs the `full` signature on a float32 `[1, H, W, C]` frame of pixels.

        Raises:
          ValueError, FrameError: as `classify`.
        """
        self._check_frame(frame)
        return self._run_full(frame)

    def _run_full(self, frame: np.ndarray) -> int:
        self._feed(self._full_in, frame)
        self._full.invoke()
        answer = int(self._full_out.argmax())
        if not math.isfinite(self._full_out.item(answer)):  # As the head's, above.
            raise FrameError("The full model's probabilities for this frame are not finite; "
                             "it was not classified.")
        return answer

    def stage_similarities(self, frame: np.ndarray) -> list[np.ndarray]:
        """Similarities to all centres at every stage (no exits), for analysis."""
        frame = self._frame(frame)
        self._check_frame(frame)
        activation = self.preprocessing.apply(frame)
        out = []
        for stage in self._stages:
            stage.set_input("activation", activation)
            stage.invoke()
            out.append(stage.output("similarities"))
            activation = stage.output("next_activation")
        return out
