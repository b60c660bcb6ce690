"""Seeded, reproducible frame streams drawn from a labelled split.

A stream is a sequence of indices into the split's images. Class statistics
differ by kind: `uniform` has no locality, `zipf` a long tail, and `video`
scenes in which a few hot classes repeat until the scene changes.
"""

from __future__ import annotations

import dataclasses
import enum

import numpy as np


class StreamKind(str, enum.Enum):
    UNIFORM = "uniform"
    ZIPF = "zipf"
    VIDEO = "video"
    # Scenes where half the frames show classes outside the scene's hot set.
    OPEN_SET = "open_set"


@dataclasses.dataclass(frozen=True)
class Stream:
    """Frames as indices into a split, with their labels."""

    kind: StreamKind
    indices: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.indices)


def _by_class(labels: np.ndarray) -> list[np.ndarray]:
    labels = np.asarray(labels)
    num_classes = int(labels.max()) + 1
    groups = [np.flatnonzero(labels == c) for c in range(num_classes)]
    return groups


def _draw(groups, classes: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    sizes = np.array([len(g) for g in groups])
    if (sizes[classes] == 0).any():
        raise ValueError("A stream drew a class that has no images in the split.")
    picks = (rng.random(len(classes)) * sizes[classes]).astype(np.int64)
    return np.array([groups[c][i] for c, i in zip(classes, picks)], np.int64)


def uniform(labels: np.ndarray, num_frames: int, seed: int = 0) -> Stream:
    """Independent frames drawn uniformly from the split (no locality)."""
    _check(num_frames)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(labels), num_frames)
    return Stream(StreamKind.UNIFORM, idx, np.asarray(labels)[idx])


def zipf(labels: np.ndarray, num_frames: int, exponent: float = 1.2,
         seed: int = 0) -> Stream:
    """Independent frames whose classes follow a Zipf law over a random ranking.

    Args:
      exponent: p(rank r) is proportional to r**-exponent; 0 is uniform.
    """
    _check(num_frames)
    if exponent < 0:
        raise ValueError(f"zipf exponent must be >= 0, got {exponent}.")
    rng = np.random.default_rng(seed)
    groups = _by_class(labels)
    present = np.flatnonzero([len(g) > 0 for g in groups])
    ranking = rng.permutation(present)
    p = np.arange(1, len(present) + 1, dtype=np.float64) ** -exponent
    classes = ranking[rng.choice(len(present), num_frames, p=p / p.sum())]
    idx = _draw(groups, classes, rng)
    return Stream(StreamKind.ZIPF, idx, np.asarray(labels)[idx])


def video(labels: np.ndarray, num_frames: int, seed: int = 0,
          hot_classes: tuple[int, int] = (1, 3), scene_length: tuple[int, int] = (50, 300),
          background: float = 0.05, outside: float = 0.0) -> Stream:
    """Scenes of random length in which a small hot set of classes repeats.

    Args:
      hot_classes: (min, max) size of each scene's hot set.
      scene_length: (min, max) frames per scene.
      background: share of frames drawn from any class (things passing by).
      outside: share of frames drawn from classes NOT in the scene's hot set
        (frames a cache of the scene's classes does not hold).
    """
    if not 0.0 <= outside <= 1.0:
        raise ValueError(f"outside must be in [0, 1], got {outside}.")
    _check(num_frames)
    if not 1 <= hot_classes[0] <= hot_classes[1]:
        raise ValueError(f"hot_classes must satisfy 1 <= min <= max, got {hot_classes}.")
    if not 1 <= scene_length[0] <= scene_length[1]:
        raise ValueError(f"scene_length must satisfy 1 <= min <= max, got {scene_length}.")
    if not 0.0 <= background <= 1.0:
        raise ValueError(f"background must be in [0, 1], got {background}.")
    rng = np.random.default_rng(seed)
    groups = _by_class(labels)
    present = np.flatnonzero([len(g) > 0 for g in groups])  # Classes with frames.
    num_classes = len(present)
    classes = np.empty(num_frames, np.int64)
    start = 0
    while start < num_frames:
        length = int(rng.integers(scene_length[0], scene_length[1] + 1))
        k = int(rng.integers(hot_classes[0], min(hot_classes[1], num_classes) + 1))
        hot = present[rng.choice(num_classes, k, replace=False)]
        end = min(num_frames, start + length)
        scene = hot[rng.integers(0, k, end - start)]
        passing = rng.random(end - start) < background
        scene[passing] = present[rng.integers(0, num_classes, passing.sum())]
        others = np.setdiff1d(present, hot)
        if outside > 0 and others.size:
            away = rng.random(end - start) < outside
            scene[away] = others[rng.integers(0, others.size, away.sum())]
        classes[start:end] = scene
        start = end
    idx = _draw(groups, classes, rng)
    return Stream(StreamKind.VIDEO, idx, np.asarray(labels)[idx])


def make_stream(kind: StreamKind | str, labels: np.ndarray, num_frames: int,
                seed: int = 0, zipf_exponent: float = 1.2) -> Stream:
    """Builds a stream by kind name (the `--stream` flag)."""
    try:
        kind = StreamKind(kind)
    except ValueError as e:
        raise ValueError(
            f"Unknown stream {kind!r}; choose one of "
            f"{[k.value for k in StreamKind]}.") from e
    if kind is StreamKind.UNIFORM:
        return uniform(labels, num_frames, seed)
    if kind is StreamKind.ZIPF:
        return zipf(labels, num_frames, zipf_exponent, seed)
    if kind is StreamKind.OPEN_SET:
        return dataclasses.replace(video(labels, num_frames, seed, outside=0.5),
                                   kind=StreamKind.OPEN_SET)
    return video(labels, num_frames, seed)


def _check(num_frames: int) -> None:
    if num_frames < 1:
        raise ValueError(f"A stream needs at least one frame, got num_frames={num_frames}.")
