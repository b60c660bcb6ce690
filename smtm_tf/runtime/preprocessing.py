"""Input preprocessing: what a model expects to be done to camera pixels.

Many Keras models are trained on pixels scaled outside the model (x / 255,
[-1, 1], ImageNet mean/std). That step is a property of the model: the
converter records it in the descriptor, and every runtime applies it to the
pixels an app passes, so the app never needs to know it. The model sees
`pixel * scale + offset`, per channel.

A model whose first layer is a `Rescaling` or `Normalization` layer does this
itself and takes pixels as they are (`Preprocessing.raw()`, source "model").
"""

from __future__ import annotations

import dataclasses
import enum
import math

import numpy as np


class PreprocessingError(ValueError):
    """Raised for preprocessing that is malformed or contradicts the model."""


class Preset(str, enum.Enum):
    """Named preprocessing, as `--preprocessing` takes it."""

    RAW = "raw"  # Pixels as they are (0..255).
    UNIT = "unit"  # x / 255: [0, 1].
    SYMMETRIC = "symmetric"  # x / 127.5 - 1: [-1, 1].
    IMAGENET = "imagenet"  # (x / 255 - mean) / std with ImageNet's RGB statistics.


# ImageNet RGB statistics on [0, 1] pixels (torchvision / keras "torch" mode).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """The model's input is `pixel * scale + offset`, per channel.

    Attributes:
      scale: one factor per channel (or one for all).
      offset: one term per channel (or one for all).
      source: where it comes from: "model" (a leading Rescaling or
        Normalization layer does it inside the graph: scale 1, offset 0),
        "flags" (stated by the user), or a preset's name.
    """

    scale: tuple[float, ...] = (1.0,)
    offset: tuple[float, ...] = (0.0,)
    source: str = Preset.RAW.value

    def __post_init__(self):
        for field in ("scale", "offset"):
            values = getattr(self, field)
            if isinstance(values, (int, float)):
                values = (values,)
            try:
                if any(isinstance(v, (bool, str, bytes)) for v in values):
                    raise TypeError("booleans and strings are not numbers")
                values = tuple(float(v) for v in values)
            except (TypeError, ValueError) as e:
                raise PreprocessingError(f"preprocessing.{field} must be numbers, got "
                                         f"{values!r}.") from e
            if not values or not all(math.isfinite(v) for v in values):
                raise PreprocessingError(
                    f"preprocessing.{field} must be finite numbers, got {values!r}.")
            object.__setattr__(self, field, values)
        if any(v == 0.0 for v in self.scale):
            raise PreprocessingError(f"preprocessing.scale must not be 0, got {self.scale}.")
        if len(self.scale) != len(self.offset) and 1 not in (len(self.scale), len(self.offset)):
            raise PreprocessingError(
                f"preprocessing.scale has {len(self.scale)} values and offset "
                f"{len(self.offset)}: give one per channel, or one for all.")
        if not isinstance(self.source, str) or not self.source:
            raise PreprocessingError(f"preprocessing.source must be a name, got {self.source!r}.")

    @classmethod
    def raw(cls, source: str = Preset.RAW.value) -> "Preprocessing":
        return cls((1.0,), (0.0,), source)

    @classmethod
    def preset(cls, name: Preset | str, channels: int = 3) -> "Preprocessing":
        """A named preset for a model with `channels` input channels."""
        try:
            preset = Preset(name)
        except ValueError as e:
            raise PreprocessingError(
                f"Unknown preprocessing {name!r}; choose one of "
                f"{[p.value for p in Preset]}, or give --input_scale/--input_offset.") from e
        if preset is Preset.RAW:
            return cls.raw()
        if preset is Preset.UNIT:
            return cls((1 / 255,), (0.0,), preset.value)
        if preset is Preset.SYMMETRIC:
            return cls((1 / 127.5,), (-1.0,), preset.value)
        if channels != 3:
            raise PreprocessingError(
                f"--preprocessing=imagenet needs RGB input; the model takes {channels} "
                "channel(s). Give --input_scale and --input_offset instead.")
        std = np.asarray(IMAGENET_STD)
        return cls(tuple(1 / (255 * std)), tuple(-np.asarray(IMAGENET_MEAN) / std),
                   preset.value)

    @property
    def is_identity(self) -> bool:
        return all(v == 1.0 for v in self.scale) and all(v == 0.0 for v in self.offset)

    def check_channels(self, channels: int) -> None:
        for field in ("scale", "offset"):
            n = len(getattr(self, field))
            if n not in (1, channels):
                raise PreprocessingError(
                    f"preprocessing.{field} has {n} values for a model with {channels} "
                    "input channels: give one per channel, or one for all.")

    def arrays(self, channels: int) -> tuple[np.ndarray, np.ndarray]:
        """(scale, offset) as float32 `[channels]` arrays."""
        self.check_channels(channels)
        scale = np.broadcast_to(np.asarray(self.scale, np.float32), (channels,))
        offset = np.broadcast_to(np.asarray(self.offset, np.float32), (channels,))
        return np.ascontiguousarray(scale), np.ascontiguousarray(offset)

    def apply(self, pixels: np.ndarray) -> np.ndarray:
        """The model's input for pixel images `[..., C]` (float32)."""
        x = np.asarray(pixels, np.float32)
        if self.is_identity:
            return x
        scale, offset = self.arrays(x.shape[-1])
        return x * scale + offset

    def unapply(self, inputs: np.ndarray) -> np.ndarray:
        """The pixels that model inputs `[..., C]` came from (`apply`'s inverse, float32)."""
        x = np.asarray(inputs, np.float32)
        if self.is_identity:
            return x
        scale, offset = self.arrays(x.shape[-1])
        return (x - offset) / scale

    def to_dict(self) -> dict:
        return {"scale": list(self.scale), "offset": list(self.offset), "source": self.source}

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocessing":
        if not isinstance(d, dict) or set(d) != {"scale", "offset", "source"}:
            raise PreprocessingError(
                "preprocessing must be an object with exactly scale, offset and source, "
                f"got {d!r}.")
        return cls(tuple(d["scale"]), tuple(d["offset"]), d["source"])

    def describe(self) -> str:
        if self.source == "model":
            return "none outside the model (its first layer rescales the pixels)"
        if self.is_identity:
            return "none: the model takes pixels 0..255"
        fmt = lambda v: ", ".join(f"{x:.6g}" for x in v)  # noqa: E731
        return f"pixel * [{fmt(self.scale)}] + [{fmt(self.offset)}] ({self.source})"


def leading_rescaling_layer(model) -> str | None:
    """The name of a Rescaling/Normalization layer the model applies to its input first.

    Only layers that read the model's input directly count (after the input
    layer), so a Normalization deep inside the network does not.
    """
    inputs = model.inputs
    if not inputs:
        return None
    first = inputs[0]
    for layer in model.layers:
        if type(layer).__name__ not in ("Rescaling", "Normalization"):
            continue
        ins = layer.input if isinstance(layer.input, (list, tuple)) else [layer.input]
        if any(t is first for t in ins):
            return layer.name
    return None


def resolve(model, preset: str | None = None, scale=None, offset=None) -> Preprocessing:
    """The preprocessing for `model`, from its layers or the user's flags.

    Args:
      model: the Keras model.
      preset: a `Preset` name, or None.
      scale, offset: explicit per-channel (or single) values, or None.

    Raises:
      PreprocessingError: for a preset together with explicit values, or
        flags that would rescale pixels the model already rescales itself.
    """
    channels = int(model.inputs[0].shape[-1])
    explicit = scale is not None or offset is not None
    if preset is not None and explicit:
        raise PreprocessingError(
            "Give either --preprocessing or --input_scale/--input_offset, not both.")
    layer = leading_rescaling_layer(model)
    if layer is not None:
        if explicit or (preset is not None and Preset(preset) is not Preset.RAW):
            raise PreprocessingError(
                f"The model's first layer {layer!r} already rescales its input, so it takes "
                "pixels as they are; --preprocessing/--input_scale would rescale twice. "
                "Drop those flags.")
        return Preprocessing.raw(source="model")
    if explicit:
        result = Preprocessing(tuple(scale) if scale is not None else (1.0,),
                               tuple(offset) if offset is not None else (0.0,), "flags")
    elif preset is not None:
        result = Preprocessing.preset(preset, channels)
    else:
        result = Preprocessing.raw()
    result.check_channels(channels)
    return result
