"""The SMTM descriptor: versioned JSON embedded in the .tflite's metadata.

It tells a host runtime everything it needs beyond the model's signatures:
the stages and their tensor names, the class names, the centres of every class
at every stage (the memory), the exit rule, and the cache-lookup operator the
runtime implements.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import re
from typing import Any

import numpy as np

from smtm_tf.runtime import cache as cache_lib
from smtm_tf.runtime import exit_policy
from smtm_tf.runtime import preprocessing as prep

SCHEMA_VERSION = 2
READABLE_SCHEMA_VERSIONS = (1, 2)
METADATA_NAME = "smtm_descriptor"
LOOKUP_OP_NAME = "SMTM_CACHE_LOOKUP"
# How the weights and kernels are quantized (converters/quantization.py);
# signature inputs and outputs are float32 in every variant.
QUANTIZATIONS = ("float32", "float16", "dynamic", "int8", "qat")
# Versions of the cache-lookup operator this runtime implements.
LOOKUP_OP_VERSIONS = (1,)
DTYPES = ("float32", "int32", "bool")
# Bounds on what a model file may ask for: far above any real model, low
# enough that a hostile file cannot make the loader allocate or recurse
# without limit (json.loads recurses once per nesting level).
MAX_DESCRIPTOR_BYTES = 64 << 20
MAX_JSON_DEPTH = 16
MAX_DIM = 1 << 20
MAX_CLASSES = 100_000
MAX_STAGES = 64
# A stored centre is unit-norm (float32 round off) or exactly zero: the
# converter writes zero rows for classes with no frame fitting the stage.
CENTRE_NORM_TOLERANCE = 1e-3
# The tensors each kind of signature exchanges with the host runtime.
STAGE_INPUTS = ("activation", "centres")
STAGE_OUTPUTS = ("next_activation", "semantic", "similarities")
HEAD_INPUTS, FULL_INPUTS, PROBABILITY_OUTPUTS = ("activation",), ("image",), ("probabilities",)


class ModelFileError(ValueError):
    """Raised for a model file that cannot be run as it is.

    Every way a model file can be wrong raises this (or its subclass
    `DescriptorError`) from `SmtmRuntime(...)` and `read_descriptor`: not a
    .tflite flatbuffer, not made by smtm_tf's converter, a descriptor that is
    malformed, out of range or of an unknown version, or one that does not
    match the model's graph. The message names the bad field, e.g.
    "stages[1].centres: row 3 is not unit-norm (norm 1e+30)".
    """


class DescriptorError(ModelFileError):
    """Raised for a descriptor that is malformed, out of range or of an unknown version.

    Attributes:
      field: the path of the bad field ("stages[1].centres"), or "" for the
        descriptor as a whole.
      reason: what is wrong with it.
    """

    def __init__(self, reason: str, field: str = ""):
        super().__init__(f"{field}: {reason}" if field else reason)
        self.field = field
        self.reason = reason


@contextlib.contextmanager
def _at(field: str):
    """Prefixes errors raised inside with the descriptor field they concern."""
    try:
        yield
    except DescriptorError as e:
        inner = e.field
        path = field + ("" if not inner else inner if inner.startswith("[") else "." + inner)
        raise DescriptorError(e.reason, path) from e
    except (TypeError, ValueError, KeyError, AttributeError, IndexError,
            OverflowError) as e:
        kind = "" if type(e) is ValueError else f"{type(e).__name__}: "
        raise DescriptorError(f"{kind}{e}", field) from e


def _whole(value, what: str, low: int = 0, high: int = MAX_DIM) -> int:
    """An integer field, as an int in [low, high] (JSON may spell it 3.0)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer)):
        raise DescriptorError(f"{what} must be a whole number, got {value!r}.")
    if isinstance(value, float) and not (math.isfinite(value) and value.is_integer()):
        raise DescriptorError(f"{what} must be a whole number, got {value!r}.")
    if not low <= value <= high:
        raise DescriptorError(f"{what} must be in [{low}, {high}], got {value!r}.")
    return int(value)


def _finite(value, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
        raise DescriptorError(f"{what} must be a number, got {value!r}.")
    if not math.isfinite(float(value)):
        raise DescriptorError(f"{what} must be finite, got {value!r}.")
    return float(value)


def _text(value, what: str) -> str:
    if not isinstance(value, str) or not value:
        raise DescriptorError(f"{what} must be a non-empty string, got {value!r}.")
    return value


def _check_fields(cls, d: dict) -> None:
    if not isinstance(d, dict):
        raise DescriptorError(f"{cls.__name__} must be a JSON object, got {type(d).__name__}.")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - names
    missing = {f.name for f in dataclasses.fields(cls)
               if f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING} - set(d)
    if unknown or missing:
        raise DescriptorError(
            f"{cls.__name__}: unknown fields {sorted(unknown)}, missing fields "
            f"{sorted(missing)}.")


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str = "float32"

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise DescriptorError("A tensor needs a name.")
        if isinstance(self.shape, (str, bytes, dict)) or len(self.shape) > 8:
            raise DescriptorError(f"shape must be a list of at most 8 sizes, got {self.shape!r}.")
        # -1: any size (the lookup operator's inputs); graph tensors have sizes.
        object.__setattr__(self, "shape", tuple(
            _whole(d, f"shape[{i}]", -1) for i, d in enumerate(self.shape)))
        if self.dtype not in DTYPES:
            raise DescriptorError(f"dtype must be one of {list(DTYPES)}, got {self.dtype!r}.")

    def to_dict(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}

    @classmethod
    def from_dict(cls, d: dict) -> "TensorSpec":
        _check_fields(cls, d)
        return cls(**d)


@dataclasses.dataclass(frozen=True)
class SignatureSpec:
    """A signature of the .tflite: its key and named inputs and outputs."""

    key: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    def __post_init__(self):
        _text(self.key, "key")

    def tensor(self, kind: str, name: str) -> TensorSpec | None:
        return next((t for t in getattr(self, kind) if t.name == name), None)

    def check_names(self, inputs: tuple[str, ...], outputs: tuple[str, ...]) -> None:
        """Raises DescriptorError unless the tensors are exactly these, once each."""
        for kind, want in (("inputs", inputs), ("outputs", outputs)):
            names = [t.name for t in getattr(self, kind)]
            if sorted(names) != sorted(want):
                raise DescriptorError(f"signature {self.key!r} must have the tensors "
                                      f"{sorted(want)}, the descriptor lists {names}.", kind)

    def to_dict(self) -> dict:
        return {"key": self.key, "inputs": [t.to_dict() for t in self.inputs],
                "outputs": [t.to_dict() for t in self.outputs]}

    @classmethod
    def from_dict(cls, d: dict) -> "SignatureSpec":
        _check_fields(cls, d)
        return cls(d["key"], _tensors(d, "inputs"), _tensors(d, "outputs"))


def _tensors(d: dict, kind: str) -> tuple[TensorSpec, ...]:
    if not isinstance(d[kind], list) or len(d[kind]) > 16:
        raise DescriptorError(f"{kind} must be a list of at most 16 tensors.")
    out = []
    for i, t in enumerate(d[kind]):
        with _at(f"{kind}[{i}]"):
            out.append(TensorSpec.from_dict(t))
    return tuple(out)


@dataclasses.dataclass(frozen=True)
class StageSpec:
    """One stage: its signature, cost and the centres of all classes there.

    Attributes:
      signature: inputs `activation` and `centres` [K, D]; outputs
        `next_activation`, `semantic` [D] and `similarities` [K].
      cut_layer: the Keras layer that ends the stage.
      cost: the stage's share of the full model's multiply-adds.
      centres: `[C, D]` unit centres of every class at this stage.
    """

    signature: SignatureSpec
    cut_layer: str
    cost: float
    centres: np.ndarray

    def __post_init__(self):
        with _at("centres"):
            centres = np.asarray(self.centres, np.float32)
        if centres.ndim != 2:
            raise DescriptorError(f"Stage centres must be [C, D], got shape {centres.shape}.")
        if not np.isfinite(centres).all():
            row = int(np.flatnonzero(~np.isfinite(centres).all(axis=1))[0])
            raise DescriptorError(f"row {row} holds non-finite values.", "centres")
        norms = np.sqrt((centres.astype(np.float64) ** 2).sum(axis=1))
        bad = (np.abs(norms - 1.0) > CENTRE_NORM_TOLERANCE) & (norms != 0.0)
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise DescriptorError(f"row {row} is not unit-norm (norm {norms[row]:.6g}).",
                                  "centres")
        object.__setattr__(self, "centres", centres)
        object.__setattr__(self, "cost", _finite(self.cost, "cost"))
        if self.cost < 0:
            raise DescriptorError(f"cost must be >= 0, got {self.cost}.")
        _text(self.cut_layer, "cut_layer")
        k, dim = centres.shape
        with _at("signature"):
            self.signature.check_names(STAGE_INPUTS, STAGE_OUTPUTS)
            for kind, name, shape in (("inputs", "centres", (k, dim)),
                                      ("outputs", "semantic", (dim,)),
                                      ("outputs", "similarities", (k,))):
                t = self.signature.tensor(kind, name)
                if t.shape != shape:
                    raise DescriptorError(
                        f"{name!r} has shape {list(t.shape)}; the stage's centres "
                        f"[{k}, {dim}] need {list(shape)}.", kind)

    @property
    def embedding_dim(self) -> int:
        return int(self.centres.shape[1])

    def __eq__(self, other):
        return (isinstance(other, StageSpec) and self.signature == other.signature
                and self.cut_layer == other.cut_layer and self.cost == other.cost
                and np.array_equal(self.centres, other.centres))

    def to_dict(self) -> dict:
        return {"signature": self.signature.to_dict(), "cut_layer": self.cut_layer,
                "cost": self.cost,
                # The shortest decimal that reads back as the same float32:
                # half the size of float64 digits, and the round trip is exact.
                "centres": [[float(str(v)) for v in row] for row in self.centres]}

    @classmethod
    def from_dict(cls, d: dict) -> "StageSpec":
        _check_fields(cls, d)
        with _at("signature"):
            signature = SignatureSpec.from_dict(d["signature"])
        with _at("cost"):
            cost = _finite(d["cost"], "cost")
        with _at("centres"):
            if not isinstance(d["centres"], list):
                raise DescriptorError("must be a list of rows.")
            centres = np.asarray(d["centres"], np.float32)
        return cls(signature, d["cut_layer"], cost, centres)


@dataclasses.dataclass(frozen=True)
class LookupOpSpec:
    """The cache-lookup operator a host runtime implements between stages.

    It takes a stage's `similarities` to the K centres fed to that stage (and
    the class id of each), and returns the class and whether to exit, by the
    exit rule in the attributes.
    """

    name: str = LOOKUP_OP_NAME
    version: int = 1
    inputs: tuple[TensorSpec, ...] = (
        TensorSpec("similarities", (-1,), "float32"),
        TensorSpec("class_ids", (-1,), "int32"),
        TensorSpec("stage", (), "int32"),
    )
    outputs: tuple[TensorSpec, ...] = (
        TensorSpec("class_id", (), "int32"),
        TensorSpec("score", (), "float32"),
        TensorSpec("exit", (), "bool"),
    )
    attributes: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if self.name != LOOKUP_OP_NAME:
            raise DescriptorError(f"the operator {self.name!r} is unknown; this runtime "
                                  f"implements {LOOKUP_OP_NAME!r}.", "name")
        if isinstance(self.version, bool) or self.version not in LOOKUP_OP_VERSIONS:
            raise DescriptorError(
                f"{LOOKUP_OP_NAME} version {self.version!r} is unknown; this runtime "
                f"implements versions {list(LOOKUP_OP_VERSIONS)}. Upgrade smtm_tf.", "version")
        default = LookupOpSpec.__dataclass_fields__
        for kind in ("inputs", "outputs"):
            if tuple(getattr(self, kind)) != default[kind].default:
                raise DescriptorError(f"{[t.to_dict() for t in getattr(self, kind)]} are not "
                                      f"the {LOOKUP_OP_NAME} v{self.version} {kind}.", kind)
        if not isinstance(self.attributes, dict):
            raise DescriptorError("attributes must be a JSON object.")
        compare = self.attributes.get("compare_with", "all_classes")
        if compare != "all_classes":
            raise DescriptorError(f"{compare!r} is unknown; this runtime compares with "
                                  "'all_classes'.", "attributes.compare_with")

    def to_dict(self) -> dict:
        return {"name": self.name, "version": self.version,
                "inputs": [t.to_dict() for t in self.inputs],
                "outputs": [t.to_dict() for t in self.outputs],
                "attributes": dict(self.attributes)}

    @classmethod
    def from_dict(cls, d: dict) -> "LookupOpSpec":
        _check_fields(cls, d)
        with _at("version"):
            version = _whole(d["version"], "version")
        return cls(d["name"], version, _tensors(d, "inputs"), _tensors(d, "outputs"),
                   d["attributes"])


@dataclasses.dataclass(frozen=True)
class Descriptor:
    """All that SMTM adds to a .tflite, as stored in its metadata."""

    model_name: str
    class_names: tuple[str, ...]
    pooling: str
    stages: tuple[StageSpec, ...]
    head: SignatureSpec
    full: SignatureSpec
    exit_rule: exit_policy.ExitRule
    lookup_op: LookupOpSpec
    quantization: str = "float32"
    cache: cache_lib.CachePolicy | None = None
    preprocessing: prep.Preprocessing = prep.Preprocessing.raw()
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self):
        if self.schema_version != SCHEMA_VERSION:
            raise DescriptorError(
                f"Descriptor schema_version {self.schema_version!r} is not supported; "
                f"this smtm_tf writes version {SCHEMA_VERSION}. Re-convert the model "
                "with this version of smtm_tf, or upgrade smtm_tf.")
        with _at("full"):
            self.full.check_names(FULL_INPUTS, PROBABILITY_OUTPUTS)
        channels = self.full.inputs[0].shape[-1] if self.full.inputs[0].shape else 0
        try:
            self.preprocessing.check_channels(channels)
        except prep.PreprocessingError as e:
            raise DescriptorError(str(e)) from e
        if self.quantization not in QUANTIZATIONS:
            raise DescriptorError(
                f"quantization {self.quantization!r} is not one of {list(QUANTIZATIONS)}.")
        if not self.stages:
            raise DescriptorError("A descriptor needs at least one stage.")
        if self.exit_rule.uses_cache and self.cache is None:
            raise DescriptorError("exit_rule has cold thresholds but the descriptor no cache.")
        if len(self.exit_rule.thresholds) != len(self.stages):
            raise DescriptorError(
                f"exit_rule has {len(self.exit_rule.thresholds)} thresholds for "
                f"{len(self.stages)} stages.")
        params = self.exit_rule.metric_params or ()
        for s, p in enumerate(params):
            if p.shape[0] != len(self.class_names):
                raise DescriptorError(
                    f"exit_rule.metric_params[{s}] covers {p.shape[0]} classes, the "
                    f"descriptor has {len(self.class_names)}.")
        for s, stage in enumerate(self.stages):
            if stage.centres.shape[0] != len(self.class_names):
                raise DescriptorError(
                    f"stages[{s}] holds {stage.centres.shape[0]} centres for "
                    f"{len(self.class_names)} classes.")
        self._check_structure()

    def _check_structure(self) -> None:
        """Names, sizes and the chain of shapes from stage to stage."""
        _text(self.model_name, "model_name")
        _text(self.pooling, "pooling")
        if not 1 <= len(self.class_names) <= MAX_CLASSES or not all(
                isinstance(c, str) for c in self.class_names):
            raise DescriptorError(f"must be 1 to {MAX_CLASSES} strings.", "class_names")
        if len(self.stages) > MAX_STAGES:
            raise DescriptorError(f"{len(self.stages)} stages, at most {MAX_STAGES}.", "stages")
        with _at("head"):
            self.head.check_names(HEAD_INPUTS, PROBABILITY_OUTPUTS)
        with _at("full"):
            self.full.check_names(FULL_INPUTS, PROBABILITY_OUTPUTS)
        keys = [st.signature.key for st in self.stages] + [self.head.key, self.full.key]
        if len(set(keys)) != len(keys):
            raise DescriptorError(f"signature keys {keys} name one signature twice.")
        k = (len(self.class_names),)
        for field, sig in (("head", self.head), ("full", self.full)):
            if sig.outputs[0].shape != k:
                raise DescriptorError(f"shape {list(sig.outputs[0].shape)}, the descriptor has "
                                      f"{k[0]} classes.", f"{field}.outputs[0]")
        # Stage s takes what stage s - 1 gives (the image for stage 0), and
        # the head what the last stage gives.
        given, by = self.full.inputs[0].shape, "full.inputs[0] (image)"
        for s, st in enumerate(self.stages):
            if st.signature.key != f"stage_{s}":
                raise DescriptorError(f"key {st.signature.key!r}: stage {s} is the signature "
                                      f"'stage_{s}'.", f"stages[{s}].signature")
            taken = st.signature.tensor("inputs", "activation").shape
            if taken != given:
                raise DescriptorError(f"activation shape {list(taken)} is not that of {by}, "
                                      f"{list(given)}.", f"stages[{s}].signature")
            given = st.signature.tensor("outputs", "next_activation").shape
            by = f"stages[{s}] next_activation"
        taken = self.head.inputs[0].shape
        if taken != given:
            raise DescriptorError(f"activation shape {list(taken)} is not that of {by}, "
                                  f"{list(given)}.", "head")

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def to_dict(self) -> dict:
        return {
            "schema_version": self.schema_version,
            "model_name": self.model_name,
            "class_names": list(self.class_names),
            "pooling": self.pooling,
            "stages": [s.to_dict() for s in self.stages],
            "head": self.head.to_dict(),
            "full": self.full.to_dict(),
            "exit_rule": self.exit_rule.to_dict(),
            "lookup_op": self.lookup_op.to_dict(),
            "quantization": self.quantization,
            "cache": None if self.cache is None else self.cache.to_dict(),
            "preprocessing": self.preprocessing.to_dict(),
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Descriptor":
        if not isinstance(d, dict):
            raise DescriptorError(f"A descriptor must be a JSON object, got {type(d).__name__}.")
        version = d.get("schema_version")
        if isinstance(version, bool) or version not in READABLE_SCHEMA_VERSIONS:
            raise DescriptorError(
                f"Descriptor schema_version {version!r} is not supported; this smtm_tf "
                f"reads versions {list(READABLE_SCHEMA_VERSIONS)}. Re-convert the model "
                "with this version of smtm_tf, or upgrade smtm_tf.")
        if version == 1:
            if "preprocessing" in d:
                raise DescriptorError("A version-1 descriptor has no preprocessing field.")
            d = dict(d, preprocessing=prep.Preprocessing.raw().to_dict())
        _check_fields(cls, d)
        try:
            return cls._from_checked_dict(d)
        except DescriptorError:
            raise
        except (TypeError, ValueError, KeyError, AttributeError, IndexError,
                OverflowError) as e:
            raise DescriptorError(
                f"Malformed descriptor ({type(e).__name__}: {e}). Re-convert the model.") from e

    @classmethod
    def _from_checked_dict(cls, d: dict) -> "Descriptor":
        with _at("exit_rule"):
            if not isinstance(d["exit_rule"], dict):
                raise DescriptorError("must be a JSON object.")
            rule = exit_policy.ExitRule.from_dict(d["exit_rule"])
        with _at("cache"):
            cache = None if d.get("cache") is None else cache_lib.CachePolicy.from_dict(d["cache"])
        with _at("preprocessing"):
            preprocessing = prep.Preprocessing.from_dict(d["preprocessing"])
        if not isinstance(d["stages"], list) or len(d["stages"]) > MAX_STAGES:
            raise DescriptorError(f"must be a list of at most {MAX_STAGES} stages.", "stages")
        stages = []
        for s, stage in enumerate(d["stages"]):
            with _at(f"stages[{s}]"):
                stages.append(StageSpec.from_dict(stage))
        with _at("head"):
            head = SignatureSpec.from_dict(d["head"])
        with _at("full"):
            full = SignatureSpec.from_dict(d["full"])
        with _at("lookup_op"):
            lookup = LookupOpSpec.from_dict(d["lookup_op"])
        if not isinstance(d["class_names"], list):
            raise DescriptorError("must be a list of strings.", "class_names")
        return cls(
            model_name=d["model_name"], class_names=tuple(d["class_names"]),
            pooling=d["pooling"], stages=tuple(stages), head=head, full=full,
            exit_rule=rule, lookup_op=lookup,
            quantization=d["quantization"], cache=cache, preprocessing=preprocessing)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> "Descriptor":
        """Parses a descriptor, refusing any that is malformed or out of range.

        Raises:
          DescriptorError: naming the bad field where there is one.
        """
        if len(text) > MAX_DESCRIPTOR_BYTES:
            raise DescriptorError(f"The descriptor is {len(text)} bytes, at most "
                                  f"{MAX_DESCRIPTOR_BYTES}.")
        try:
            if isinstance(text, bytes):
                text = text.decode("utf-8")
            depth = _nesting_depth(text)
            if depth > MAX_JSON_DEPTH:
                raise DescriptorError(f"The descriptor nests {depth} levels deep, at most "
                                      f"{MAX_JSON_DEPTH}.")
            d = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
            raise DescriptorError(f"The descriptor is not valid JSON: {e}") from e
        where = _non_finite(d, "")
        if where is not None:
            raise DescriptorError("holds a non-finite number (NaN or Infinity); descriptors "
                                  "hold finite numbers only.", where)
        return cls.from_dict(d)


_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')


def _nesting_depth(text: str) -> int:
    """The deepest nesting of [ and { in JSON text, without recursing."""
    brackets = np.frombuffer(_STRING.sub("", text).encode(), np.uint8)
    step = (np.isin(brackets, (ord("["), ord("{"))).astype(np.int32)
            - np.isin(brackets, (ord("]"), ord("}"))))
    return int(np.cumsum(step).max(initial=0))


def _non_finite(value, path: str) -> str | None:
    """The path of the first non-finite number in parsed JSON, or None."""
    if isinstance(value, float):
        return None if math.isfinite(value) else (path or "descriptor")
    if isinstance(value, list):
        if value and all(isinstance(v, float) for v in value):  # Fast path: a row.
            if all(map(math.isfinite, value)):
                return None
        items = enumerate(value)
        for i, v in items:
            found = _non_finite(v, f"{path}[{i}]")
            if found:
                return found
    elif isinstance(value, dict):
        for k, v in value.items():
            found = _non_finite(v, f"{path}.{k}" if path else str(k))
            if found:
                return found
    return None


def rule_choice_json(rule: exit_policy.ExitRule,
                     cache_policy: cache_lib.CachePolicy | None = None) -> str:
    """An exit rule and cache policy as the native runtime's `smtm_set_exit_rule`
    (C), `SmtmRuntime.setExitRule` (Java) and `smtm_cli --exit_rule` take them:
    the descriptor's own `exit_rule` and `cache` fields. The native runtime then
    decides as `SmtmRuntime.set_exit_rule(rule, cache_policy)` does here.
    """
    return json.dumps({"exit_rule": rule.to_dict(),
                       "cache": None if cache_policy is None else cache_policy.to_dict()},
                      separators=(",", ":"))
