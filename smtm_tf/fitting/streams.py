"""Seeded, reproducible frame streams drawn from a labelled split.

A stream is a sequence of indices into the split's images, plus what the
camera does to them (small shifts, noise, a slow change of exposure), applied
by `Stream.render`. Class statistics differ by kind: `uniform` has no
locality, `zipf` a long tail, `video` scenes in which a few hot classes repeat
until the scene changes, `scene_change` scenes whose hot sets range from 1 to
6 classes, `drift` a scene whose classes and exposure change slowly, and
`object` one object held in view (the same image, shifted and noisy) for a
run of frames, and `camera` / `camera_pan` what a handheld camera sends:
short holds of each object in scenes of 1-4 classes, with jitter, a
brightness per hold and sensor noise; in `camera_pan` each held object also
slides across the view.
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
    # Abrupt scene changes; hot sets of 1 to 6 classes.
    SCENE_CHANGE = "scene_change"
    # One class of three replaced every few hundred frames; exposure drifts.
    DRIFT = "drift"
    # The same image held in view for a run of frames, shifted and noisy.
    OBJECT = "object"
    # Objects held 5-40 frames in scenes of 1-4 classes; +-1 px jitter, a
    # brightness of 0.85-1.15 per hold, noise sigma 4 of 255.
    CAMERA = "camera"
    # CAMERA while panning: each held object slides 4 px across the view,
    # noise sigma 8 of 255.
    CAMERA_PAN = "camera_pan"


@dataclasses.dataclass(frozen=True)
class Stream:
    """Frames as indices into a split, with their labels and camera effects.

    Attributes:
      kind: the stream kind.
      indices: per frame, the index of its image in the split.
      labels: per frame, the image's class.
      scene_starts: frames at which a new scene starts (empty: no scenes).
      shifts: `[N, 2]` integer pixel shifts (rows, columns) per frame, or None.
      gain: per-frame factor on pixel values (exposure), or None.
      noise: standard deviation of Gaussian pixel noise, as a share of the
        images' value range (0: none).
      seed: seed of the noise.
    """

    kind: StreamKind
    indices: np.ndarray
    labels: np.ndarray
    scene_starts: np.ndarray = dataclasses.field(
        default_factory=lambda: np.zeros(0, np.int64))
    shifts: np.ndarray | None = None
    gain: np.ndarray | None = None
    noise: float = 0.0
    seed: int = 0

    def __len__(self) -> int:
        return len(self.indices)

    def render(self, images: np.ndarray) -> np.ndarray:
        """The stream's frames: `images[indices]` with its shifts, exposure and noise.

        Args:
          images: the split's images `[M, H, W, C]`, values 0..peak (float or uint8).

        Returns:
          `[N, H, W, C]` float32 frames, clipped to the images' value range.
        """
        frames = np.asarray(images)[self.indices].astype(np.float32)
        if self.shifts is None and self.gain is None and not self.noise:
            return frames
        peak = 255.0 if float(np.max(images)) > 1.0 else 1.0
        if self.shifts is not None:
            for dy, dx in np.unique(self.shifts, axis=0):
                rows = np.flatnonzero((self.shifts[:, 0] == dy) & (self.shifts[:, 1] == dx))
                frames[rows] = _shift(frames[rows], int(dy), int(dx))
        if self.gain is not None:
            frames *= self.gain.astype(np.float32)[:, None, None, None]
        if self.noise:
            rng = np.random.default_rng(self.seed)
            frames += rng.normal(0.0, self.noise * peak, frames.shape).astype(np.float32)
        return np.clip(frames, 0.0, peak, out=frames)


def _shift(frames: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """Shifts `[N, H, W, C]` frames by (dy, dx) pixels, filling with zeros."""
    out = np.zeros_like(frames)
    h, w = frames.shape[1:3]
    out[:, max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = \
        frames[:, max(-dy, 0):h + min(-dy, 0), max(-dx, 0):w + min(-dx, 0)]
    return out


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
          background: float = 0.05, outside: float = 0.0,
          sizes: np.ndarray | None = None) -> Stream:
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
    starts = []
    start = 0
    while start < num_frames:
        starts.append(start)
        length = int(rng.integers(scene_length[0], scene_length[1] + 1))
        k = int(rng.integers(hot_classes[0], min(hot_classes[1], num_classes) + 1))
        if sizes is not None:
            k = min(int(sizes[len(starts) - 1]), num_classes)
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
    return Stream(StreamKind.VIDEO, idx, np.asarray(labels)[idx],
                  scene_starts=np.asarray(starts, np.int64))


def scene_change(labels: np.ndarray, num_frames: int, seed: int = 0,
                 scene_length: tuple[int, int] = (250, 450), max_hot: int = 6,
                 background: float = 0.02) -> Stream:
    """Abrupt scene changes whose hot sets take every size from 1 to `max_hot`.

    Sizes come in a shuffled cycle (each size once per cycle), so a stream of
    a few thousand frames holds scenes of every size.
    """
    if max_hot < 1:
        raise ValueError(f"max_hot must be >= 1, got {max_hot}.")
    rng = np.random.default_rng(seed + 7919)
    cycles = num_frames // max(1, scene_length[0]) // max_hot + 1
    sizes = np.concatenate([rng.permutation(np.arange(1, max_hot + 1))
                            for _ in range(cycles)])
    s = video(labels, num_frames, seed, scene_length=scene_length, background=background,
              sizes=sizes)
    return dataclasses.replace(s, kind=StreamKind.SCENE_CHANGE)


def drift(labels: np.ndarray, num_frames: int, seed: int = 0, hot_classes: int = 3,
          replace_every: int = 250, gain_range: tuple[float, float] = (0.6, 1.0),
          gain_period: int = 2000, noise: float = 0.02, background: float = 0.02) -> Stream:
    """A slowly drifting scene: one of its classes is replaced every
    `replace_every` frames, and the exposure (a gain on pixel values) swings
    between `gain_range` over `gain_period` frames.
    """
    _check(num_frames)
    if replace_every < 1 or gain_period < 1:
        raise ValueError("replace_every and gain_period must be >= 1.")
    if not 0.0 < gain_range[0] <= gain_range[1]:
        raise ValueError(f"gain_range must satisfy 0 < low <= high, got {gain_range}.")
    rng = np.random.default_rng(seed)
    groups = _by_class(labels)
    present = np.flatnonzero([len(g) > 0 for g in groups])
    k = min(hot_classes, len(present))
    hot = list(rng.choice(present, k, replace=False))
    classes = np.empty(num_frames, np.int64)
    for start in range(0, num_frames, replace_every):
        if start:
            others = np.setdiff1d(present, hot)
            if others.size:
                hot[int(rng.integers(k))] = int(rng.choice(others))
        end = min(num_frames, start + replace_every)
        scene = np.asarray(hot)[rng.integers(0, k, end - start)]
        passing = rng.random(end - start) < background
        scene[passing] = present[rng.integers(0, len(present), passing.sum())]
        classes[start:end] = scene
    idx = _draw(groups, classes, rng)
    phase = 2 * np.pi * np.arange(num_frames) / gain_period
    low, high = gain_range
    gain = low + (high - low) * 0.5 * (1.0 + np.cos(phase))
    return Stream(StreamKind.DRIFT, idx, np.asarray(labels)[idx], gain=gain, noise=noise,
                  seed=seed)


def held_object(labels: np.ndarray, num_frames: int, seed: int = 0,
                run_length: tuple[int, int] = (20, 100), max_shift: int = 1,
                noise: float = 0.02) -> Stream:
    """One object held in view: the same image for a run of frames, each frame
    shifted by up to `max_shift` pixels and with Gaussian noise; the objects'
    classes follow `video` scenes.
    """
    if not 1 <= run_length[0] <= run_length[1]:
        raise ValueError(f"run_length must satisfy 1 <= min <= max, got {run_length}.")
    if max_shift < 0 or noise < 0:
        raise ValueError("max_shift and noise must be >= 0.")
    scenes = video(labels, num_frames, seed, background=0.0)
    rng = np.random.default_rng(seed + 104729)
    idx = np.empty(num_frames, np.int64)
    starts = []
    start = 0
    while start < num_frames:
        starts.append(start)
        end = min(num_frames, start + int(rng.integers(run_length[0], run_length[1] + 1)))
        idx[start:end] = scenes.indices[start]
        start = end
    shifts = rng.integers(-max_shift, max_shift + 1, (num_frames, 2))
    return Stream(StreamKind.OBJECT, idx, np.asarray(labels)[idx],
                  scene_starts=np.asarray(starts, np.int64), shifts=shifts, noise=noise,
                  seed=seed)


def camera(labels: np.ndarray, num_frames: int, seed: int = 0,
           hold: tuple[int, int] = (5, 40), hot_classes: tuple[int, int] = (1, 4),
           max_jitter: int = 1, gain_range: tuple[float, float] = (0.85, 1.15),
           noise: float = 4 / 255, pan: int = 0) -> Stream:
    """A handheld camera: objects of `video` scenes, each held for a few frames.

    Each hold shows one image for `hold` frames (fewer where its scene ends) at
    one brightness (a gain drawn from `gain_range`), every frame jittered by up
    to `max_jitter` pixels. With `pan` > 0 the object also slides from -pan to
    +pan pixels along a random direction over its hold (the camera pans). Scenes (`scene_starts`) are the
    video's: a new set of classes.

    Args:
      noise: Gaussian noise, as a share of the value range (4 / 255: sigma 4
        on 0..255 pixels).
    """
    _check(num_frames)
    if not 1 <= hold[0] <= hold[1]:
        raise ValueError(f"hold must satisfy 1 <= min <= max, got {hold}.")
    if max_jitter < 0 or pan < 0 or noise < 0:
        raise ValueError("max_jitter, pan and noise must be >= 0.")
    if not 0.0 < gain_range[0] <= gain_range[1]:
        raise ValueError(f"gain_range must satisfy 0 < low <= high, got {gain_range}.")
    scenes = video(labels, num_frames, seed, hot_classes=hot_classes, background=0.0)
    rng = np.random.default_rng(seed + 15485863)
    idx = np.empty(num_frames, np.int64)
    gain = np.empty(num_frames)
    slide = np.zeros((num_frames, 2))
    cuts = np.append(scenes.scene_starts[1:], num_frames)  # A hold ends with its scene.
    start = 0
    while start < num_frames:
        scene_end = int(cuts[np.searchsorted(cuts, start, side="right")])
        end = min(scene_end, start + int(rng.integers(hold[0], hold[1] + 1)))
        idx[start:end] = scenes.indices[start]
        gain[start:end] = rng.uniform(*gain_range)
        if pan:
            direction = np.array([0, 0])
            while not direction.any():
                direction = rng.integers(-1, 2, 2)
            slide[start:end] = np.linspace(-pan, pan, end - start)[:, None] * direction
        start = end
    shifts = np.rint(slide).astype(np.int64) + rng.integers(-max_jitter, max_jitter + 1,
                                                             (num_frames, 2))
    kind = StreamKind.CAMERA_PAN if pan else StreamKind.CAMERA
    return Stream(kind, idx, np.asarray(labels)[idx], scene_starts=scenes.scene_starts,
                  shifts=shifts, gain=gain, noise=noise, seed=seed)


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
    if kind is StreamKind.SCENE_CHANGE:
        return scene_change(labels, num_frames, seed)
    if kind is StreamKind.DRIFT:
        return drift(labels, num_frames, seed)
    if kind is StreamKind.OBJECT:
        return held_object(labels, num_frames, seed)
    if kind is StreamKind.CAMERA:
        return camera(labels, num_frames, seed)
    if kind is StreamKind.CAMERA_PAN:
        return camera(labels, num_frames, seed, noise=8 / 255, pan=2)
    if kind is StreamKind.OPEN_SET:
        return dataclasses.replace(video(labels, num_frames, seed, outside=0.5),
                                   kind=StreamKind.OPEN_SET)
    return video(labels, num_frames, seed)


def _check(num_frames: int) -> None:
    if num_frames < 1:
        raise ValueError(f"A stream needs at least one frame, got num_frames={num_frames}.")
