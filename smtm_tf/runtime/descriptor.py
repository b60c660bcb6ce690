"""The SMTM descriptor: versioned JSON embedded in the .tflite's metadata.

It tells a host runtime everything it needs beyond the model's signatures:
the stages and their tensor names, the class names, the centres of every class
at every stage (the memory), the exit rule, and the cache-lookup operator the
runtime implements.
"""

from __future__ import annotations

import dataclasses
import json
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


class DescriptorError(ValueError):
    """Raised for a descriptor that is malformed or of an unknown version."""


def _check_fields(cls, d: dict) -> None:
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
        object.__setattr__(self, "shape", tuple(int(d) for d in self.shape))
        if not self.name:
            raise DescriptorError("A tensor needs a name.")

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

    def to_dict(self) -> dict:
        return {"key": self.key, "inputs": [t.to_dict() for t in self.inputs],
                "outputs": [t.to_dict() for t in self.outputs]}

    @classmethod
    def from_dict(cls, d: dict) -> "SignatureSpec":
        _check_fields(cls, d)
        return cls(d["key"], tuple(TensorSpec.from_dict(t) for t in d["inputs"]),
                   tuple(TensorSpec.from_dict(t) for t in d["outputs"]))


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
        centres = np.asarray(self.centres, np.float32)
        if centres.ndim != 2:
            raise DescriptorError(f"Stage centres must be [C, D], got shape {centres.shape}.")
        object.__setattr__(self, "centres", centres)

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
        return cls(SignatureSpec.from_dict(d["signature"]), d["cut_layer"],
                   float(d["cost"]), np.asarray(d["centres"], np.float32))


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

    def to_dict(self) -> dict:
        return {"name": self.name, "version": self.version,
                "inputs": [t.to_dict() for t in self.inputs],
                "outputs": [t.to_dict() for t in self.outputs],
                "attributes": dict(self.attributes)}

    @classmethod
    def from_dict(cls, d: dict) -> "LookupOpSpec":
        _check_fields(cls, d)
        return cls(d["name"], int(d["version"]),
                   tuple(TensorSpec.from_dict(t) for t in d["inputs"]),
                   tuple(TensorSpec.from_dict(t) for t in d["outputs"]),
                   dict(d["attributes"]))


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
        channels = self.full.inputs[0].shape[-1] if self.full.inputs else 0
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
        if version not in READABLE_SCHEMA_VERSIONS:
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
        except (TypeError, ValueError, KeyError, AttributeError) as e:
            raise DescriptorError(
                f"Malformed descriptor ({type(e).__name__}: {e}). Re-convert the model.") from e

    @classmethod
    def _from_checked_dict(cls, d: dict) -> "Descriptor":
        try:
            rule = exit_policy.ExitRule.from_dict(d["exit_rule"])
        except (ValueError, KeyError) as e:
            raise DescriptorError(f"Invalid exit_rule: {e}") from e
        try:
            cache = None if d.get("cache") is None else cache_lib.CachePolicy.from_dict(d["cache"])
        except (ValueError, TypeError) as e:
            raise DescriptorError(f"Invalid cache policy: {e}") from e
        try:
            preprocessing = prep.Preprocessing.from_dict(d["preprocessing"])
        except prep.PreprocessingError as e:
            raise DescriptorError(f"Invalid preprocessing: {e}") from e
        return cls(
            model_name=d["model_name"], class_names=tuple(d["class_names"]),
            pooling=d["pooling"],
            stages=tuple(StageSpec.from_dict(s) for s in d["stages"]),
            head=SignatureSpec.from_dict(d["head"]), full=SignatureSpec.from_dict(d["full"]),
            exit_rule=rule, lookup_op=LookupOpSpec.from_dict(d["lookup_op"]),
            quantization=d["quantization"], cache=cache, preprocessing=preprocessing)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> "Descriptor":
        try:
            d = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DescriptorError(f"The descriptor is not valid JSON: {e}") from e
        return cls.from_dict(d)
