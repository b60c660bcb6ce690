"""The adaptive memory a runtime keeps for a stream: cache, short-term tier, centres.

Three levels, from the slowest to change to the fastest:

- The **memory**: every class's centres at every stage (from the descriptor).
  Every lookup compares with all of them, so a frame of any class is judged
  against every class and a class the scene has not shown cannot exit wrongly
  through the cache.
- The **cache** of hot classes. Each class has a score that every frame
  multiplies by `decay` (a forgetting curve) and that grows by 1 when the full
  model answers that class with a top probability of at least
  `admit_min_confidence`, and by `exit_weight` when an early exit does (a
  wrong exit counts for less; long runs of exits are checked, see below). A
  full-model answer below that confidence adds nothing: the model is unsure
  (a trouser it reads as a dress on 40% of the frames), and caching its
  guess would lock the guess in for as long as the object stays in view.
  The cache holds the classes scoring at least `hot_min`, at most
  `capacity` of them, the highest first. The cache is a prior: a cached
  class's similarities are raised by `prior_weight` times the log of its
  share of recent answers over the uniform share (`Prior.SHARE`;
  `Prior.CONTRAST` measures it against the uncached classes instead; with
  the encoders' CosFace scale s, a weight of 1/s turns nats of prior
  evidence into cosine, as Bayes' rule on the cosine classifier's logits
  would), and a frame whose top-1 class is cached faces the stage's hot
  threshold; other classes face the stricter cold one and are never
  lowered.
- The **short-term tier**: the semantic vectors, at every stage, of the last
  `instance_slots` frames the full model confirmed with a top probability of
  at least `instance_min_confidence`, with their answers. When the camera
  holds still, the next frame's vector matches the last one's far more
  tightly than any class centre does: a match (cosine >= the rule's instance
  threshold) raises the remembered class's similarity by `instance_shift`
  and lets it face the hot threshold, so the frame can exit earlier. Early
  exits never enter it (a wrong exit would otherwise be copied for the rest
  of a held object); a verified disagreement empties it.

Capacity, in one sentence: every `window` frames, if at least `grow_after`
of the window's answers were classes that scored hot enough but were left out
for lack of room, the capacity grows by the number of distinct classes left
out, and otherwise shrinks by one if a cached class got no answer in the
window, within [min_hot, max_hot]. (Growing by one per window took 50 frames
to follow a change to a scene of six classes.)

Centre adaptation: when the full model confirms a cached class, that class's
centres move toward the frame's semantic vectors (per stage, an exponential
average of offsets with rate `adapt_rate`, its norm bounded by `max_drift`);
the original centres stay in the memory. A share `verify_rate` of early exits
is checked against the full model (its cost counts in the frame's time); a
disagreement reverts the exit class's centres to the originals, empties the
short-term tier, evicts the exit class from the cache and returns the full
model's answer.

Exit runs: exits keep their class cached, so a frame misread at stage 0 as
the cached class (a coat held in view after a pullover) can exit as it for
as long as it stays in view, and the full model never sees it. After
`verify_after` early exits in a row with no full-model answer between them
(a check is one), the next exit is checked against the full model like a
sampled one: a disagreement evicts the class, and the next frames run on to
the full model. A wrong run lasts at most `verify_after` frames.

`MemoryState` is shared by the runtime and by `smtm_tf.fitting.calibration.replay`,
so the harness decides exactly as the rule was calibrated.
"""

from __future__ import annotations

import dataclasses
import enum
import math

import numpy as np

from smtm_tf.runtime import exit_policy

_INF = float("inf")
# Bound on a policy's sizes and on a restored state's counters: far above any
# real stream, far below int64 overflow.
_MAX_COUNT = 1 << 40
_TOP1 = exit_policy.Metric.TOP1
_LAYER_AWARE = exit_policy.Metric.LAYER_AWARE


class Prior(str, enum.Enum):
    """What a cached class's prior evidence is measured against."""

    # log((score + 1/K) / ((total + 1) / K)): against the uniform share. It
    # fades as the hot set grows (a share of 1/6 is log 10/6). The default,
    # and how policies written before `prior` existed were calibrated.
    SHARE = "share"
    # log((score + 1/K) / (mean uncached score + 1/K)): against a class the
    # scene is not showing. In a scene of n classes out of K it stays large
    # (log ~ K/n times the scene's rate over the background rate). Without
    # the admission gate it was 2-5% faster than SHARE on scene changes and
    # video; with the gate it is 0-2% slower there and 6% slower on held
    # objects (docs/adaptive_memory.md).
    CONTRAST = "contrast"


@dataclasses.dataclass(frozen=True)
class CachePolicy:
    """Parameters of the adaptive memory (stored in the descriptor).

    Attributes:
      decay: per-frame factor on every class score (0 < decay < 1).
      exit_weight: what an early exit adds to its class (0..1), against 1
        for a full-model answer.
      admit_min_confidence: a full-model answer adds to its class's score
        only if the model's top probability reached this (0: always).
      hot_min: score a class needs to be cached.
      min_hot: smallest capacity of the cache.
      max_hot: largest capacity of the cache (0 disables the cache).
      window: frames between capacity decisions.
      grow_after: answers left out for lack of room, within a window, that
        make the capacity grow (by the number of distinct classes left out).
      prior_weight: cosine added to a cached class's similarities per nat
        of prior evidence (0: hot and cold thresholds only).
      prior: what the evidence is measured against (a `Prior`).
      instance_slots: frames the short-term tier holds per stage (0: none;
        off by default: its match costs about 2 us per stage looked up, more
        than its compute saving outside held objects, see
        docs/adaptive_memory.md). Calibration keeps the tier only if it
        saves compute.
      instance_match: cosine similarity to a frame in the short-term tier at
        which that frame's class is favoured (the rule's instance thresholds).
      instance_shift: cosine added to a matched frame's class.
      instance_min_confidence: a frame the full model answered enters the
        tier only if the model's top probability reached this (frames whose
        answer flips under a 1-pixel shift must not be copied).
      adapt_rate: step of centre adaptation toward confirmed frames (0: off).
      max_drift: bound on the norm of an adapted centre's offset from the
        original (unit centres: 0.3 is about 17 degrees).
      verify_rate: share of early exits checked against the full model.
      verify_after: an early exit that follows this many early exits in a
        row (no full-model answer between them) is checked against the full
        model (0: never). It bounds how long wrong exits can hold a class.
    """

    decay: float = 0.9
    exit_weight: float = 0.25
    admit_min_confidence: float = 0.9
    hot_min: float = 0.3
    min_hot: int = 1
    max_hot: int = 6
    window: int = 10
    grow_after: int = 2
    prior_weight: float = 1.0 / 8.0
    prior: Prior = Prior.SHARE
    instance_slots: int = 0
    instance_match: float = 0.95
    instance_shift: float = 0.1
    instance_min_confidence: float = 0.9
    adapt_rate: float = 0.0
    max_drift: float = 0.3
    verify_rate: float = 0.0
    verify_after: int = 64

    def __post_init__(self):
        try:
            object.__setattr__(self, "prior", Prior(self.prior))
        except ValueError:
            raise ValueError(f"prior must be one of {[p.value for p in Prior]}, got "
                             f"{self.prior!r}.") from None
        for name in ("decay", "exit_weight", "hot_min", "prior_weight", "adapt_rate",
                     "max_drift", "verify_rate", "instance_min_confidence",
                     "admit_min_confidence",
                     "instance_match", "instance_shift"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
                raise ValueError(f"{name} must be a number, got {value!r}.")
            if not math.isfinite(float(value)):
                # NaN passes every range test below (all comparisons are False).
                raise ValueError(f"{name} must be finite, got {value!r}.")
            object.__setattr__(self, name, float(value))  # numpy scalars -> JSON-safe.
        for name in ("min_hot", "max_hot", "window", "grow_after", "instance_slots",
                     "verify_after"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise ValueError(f"{name} must be a whole number, got {value!r}.")
            if value > _MAX_COUNT:
                raise ValueError(f"{name} must be <= {_MAX_COUNT}, got {value!r}.")
            object.__setattr__(self, name, int(value))
        if not 0.0 < self.decay < 1.0:
            raise ValueError(f"decay must be in (0, 1), got {self.decay}.")
        for name in ("exit_weight", "adapt_rate", "verify_rate", "instance_min_confidence",
                     "admit_min_confidence"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}.")
        if not self.hot_min > 0.0:
            raise ValueError(f"hot_min must be > 0, got {self.hot_min}.")
        for name in ("max_hot", "instance_slots", "prior_weight", "verify_after"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}.")
        if not 0 <= self.min_hot <= self.max_hot:
            raise ValueError(f"Need 0 <= min_hot <= max_hot, got min_hot={self.min_hot}, "
                             f"max_hot={self.max_hot}.")
        if self.window < 1 or self.grow_after < 1:
            raise ValueError("window and grow_after must be >= 1.")
        if not -1.0 <= self.instance_match <= 1.0 or not 0.0 <= self.instance_shift <= 2.0:
            raise ValueError(f"instance_match must be in [-1, 1] and instance_shift in "
                             f"[0, 2], got {self.instance_match}, {self.instance_shift}.")
        if not 0.0 <= self.max_drift <= 2.0:
            raise ValueError(f"max_drift must be in [0, 2], got {self.max_drift}.")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["prior"] = self.prior.value
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "CachePolicy":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"Unknown cache policy fields: {sorted(unknown)}.")
        d = dict(d)
        if not set(_LEGACY) & set(d):
            # Written before the adaptive memory: a fixed-size hot set only,
            # which is what its rule was calibrated with.
            d.update(_LEGACY, min_hot=d.get("max_hot", cls.max_hot))
        if "instance_min_confidence" not in d:  # Older adaptive policies: no gate.
            d["instance_min_confidence"] = 0.0
        # Written before `prior` existed: calibrated with the share prior.
        d.setdefault("prior", Prior.SHARE.value)
        # Written before the admission gate: every full-model answer counted.
        d.setdefault("admit_min_confidence", 0.0)
        # Written before exit runs were checked.
        d.setdefault("verify_after", 0)
        d.setdefault("instance_match", cls.instance_match)
        d.setdefault("instance_shift", cls.instance_shift)
        missing = names - set(d)
        if missing:
            raise ValueError(f"Missing cache policy fields: {sorted(missing)}. Re-convert "
                             "the model with this version of smtm_tf.")
        return cls(**d)


# The adaptive-memory fields, as a policy written without them behaves.
_LEGACY = {"window": 20, "grow_after": 2, "prior_weight": 0.0, "instance_slots": 0,
           "instance_min_confidence": 0.9, "instance_match": 0.95,
           "instance_shift": 0.1, "adapt_rate": 0.0, "max_drift": 0.3,
           "verify_rate": 0.0, "verify_after": 0}


class MemoryState:
    """The adaptive memory of one stream: what the runtime keeps between frames.

    Args:
      policy: the cache policy (None: no cache, no short-term tier).
      rule: the exit rule (an `exit_policy.ExitRule`).
      centres: per stage, the `[K, D]` original centres (all stages the same D).

    Attributes (read by the harness):
      hot: bool `[K]`, the cached classes.
      centres: `[S, K, D]` float32, the centres lookups use now.
      last_hit: whether the last frame's answer was cached when it came.
    """

    def __init__(self, policy: CachePolicy | None, rule, centres):
        dims = {np.shape(c)[1] for c in centres}
        if len(dims) != 1:
            raise ValueError(f"All stages need the same embedding size, got {sorted(dims)}.")
        self.policy = policy or CachePolicy(max_hot=0, min_hot=0, instance_slots=0,
                                            verify_after=0)
        self.rule = rule
        self.original = np.stack([np.asarray(c, np.float32) for c in centres])
        self.num_stages, self.num_classes, dim = self.original.shape
        p = self.policy
        self.use_cache = policy is not None and p.max_hot > 0 and rule.uses_cache
        self._metric = rule.metric
        # Per stage, a work row and each class's (a, b) as numpy scalars of
        # the parameters' dtype: the per-frame lookup indexes lists, not arrays.
        self._rows = list(np.zeros((self.num_stages, self.num_classes), np.float32))
        self._ab = [None if q is None else [tuple(row) for row in q]
                    for q in map(rule.stage_params, range(self.num_stages))]

        def finite(t):
            return _INF if t is None else float(t)

        self.hot_t = [finite(rule.threshold_for(s, True)) for s in range(self.num_stages)]
        self.cold_t = [finite(rule.threshold_for(s, False)) for s in range(self.num_stages)]
        inst = rule.instance_thresholds or (None,) * self.num_stages
        self.inst_t = [finite(t) for t in inst]
        self.never = [h == _INF and c == _INF and i == _INF
                      for h, c, i in zip(self.hot_t, self.cold_t, self.inst_t)]
        self.slots = p.instance_slots if (policy is not None and any(
            t < _INF for t in self.inst_t)) else 0
        self.adapting = policy is not None and p.adapt_rate > 0
        self._verify_every = round(1.0 / p.verify_rate) if p.verify_rate > 0 else 0
        self.centres = self.original.copy()
        self.offsets = np.zeros_like(self.original)
        self.inst = np.zeros((self.num_stages, max(self.slots, 1), dim), np.float32)
        self.inst_class = np.full((self.num_stages, max(self.slots, 1)), -1, np.int64)
        self.scores = np.zeros(self.num_classes, np.float64)
        self.hot = np.zeros(self.num_classes, bool)
        self.shift = np.zeros(self.num_classes, np.float32)
        self.shifting = self.use_cache and p.prior_weight > 0
        self._contrast = p.prior is Prior.CONTRAST
        self.answers = np.zeros(self.num_classes, np.int64)
        # Per class, answers in this window that were left out for lack of room.
        self.left_out = np.zeros(self.num_classes, np.int64)
        self.reset()

    def reset(self) -> None:
        """Forgets the stream: empty cache and short-term tier, original centres."""
        p = self.policy
        self.scores[:] = 0.0
        self.hot[:] = False
        self.shift[:] = 0.0
        self.answers[:] = 0
        self.capacity = p.min_hot
        self.frame_in_window = 0
        self.left_out[:] = 0
        self.forget_instances()
        self.last_hit = False
        self.exits = 0
        self.exit_run = 0
        self.checks = 0
        self.disagreements = 0
        self.reverts = 0
        self.revert_centres()

    def forget_instances(self) -> None:
        """Empties the short-term tier."""
        self.inst_count = [0] * self.num_stages
        self.inst_next = [0] * self.num_stages
        self.inst_class[:] = -1

    def revert_centres(self, class_id: int | None = None) -> None:
        """Back to the original centres (of one class, or all)."""
        if class_id is None:
            self.centres[:] = self.original
            self.offsets[:] = 0.0
            self.adapted = np.zeros(self.num_classes, bool)
        else:
            self.centres[:, class_id] = self.original[:, class_id]
            self.offsets[:, class_id] = 0.0
            self.adapted[class_id] = False

    # The exit decision.

    def lookup(self, stage: int, similarities: np.ndarray,
               semantic: np.ndarray) -> tuple[int, float, bool]:
        """The stage's (top-1 class, score, favoured) with the priors applied.

        The cache's prior raises its classes' similarities; a short-term tier
        match (cosine >= the stage's instance threshold) raises the matched
        frame's class by `instance_shift` more. The top-1 class is favoured
        (faces the hot threshold) if it is cached or matched.
        """
        work = self._rows[stage]
        if self.shifting:
            np.add(similarities, self.shift, out=work)
        else:
            np.copyto(work, similarities)
        matched = -1
        count = self.inst_count[stage]
        if count and self.inst_t[stage] < _INF:
            match = self.inst[stage, :count] @ semantic
            j = int(match.argmax())
            if match[j] >= self.inst_t[stage]:
                matched = int(self.inst_class[stage, j])
                work[matched] += self.policy.instance_shift
        # The metric, for one frame (as `exit_policy.score`, in float32, so
        # rules calibrated on batches decide identically here).
        top1 = int(work.argmax())
        best = work[top1]
        if self._metric is _TOP1:
            value = best
        else:
            work[top1] = -np.inf
            value = best - work[work.argmax()]  # The second best (argmax is cheaper than max).
            if self._metric is _LAYER_AWARE:
                a, b = self._ab[stage][top1]
                value = a + b * value
        return top1, float(value), bool(self.hot[top1]) or top1 == matched

    def decide(self, stage: int, similarities: np.ndarray, semantic: np.ndarray) -> int:
        """The class to exit with at `stage`, or -1 to go on."""
        top1, value, favoured = self.lookup(stage, similarities, semantic)
        if value >= (self.hot_t[stage] if favoured else self.cold_t[stage]):
            return top1
        return -1

    def verify_due(self) -> bool:
        """Counts an early exit; True when this one is to be checked."""
        self.exits += 1
        self.exit_run += 1
        after = self.policy.verify_after
        return bool(after and self.exit_run > after) or (
            self._verify_every > 0 and self.exits % self._verify_every == 0)

    def verified(self, exit_class: int, full_class: int) -> None:
        """Records the full model's check of an early exit."""
        self.checks += 1
        self.exit_run = 0  # The full model has answered: a new run starts.
        if exit_class != full_class:
            self.disagreements += 1
            self.forget_instances()
            # The exit class leaves the cache: a wrong class that stays cached
            # would keep attracting wrong exits (lock-in on a held object).
            self.scores[exit_class] = 0.0
            self._refresh()
            if self.adapted[exit_class]:
                self.revert_centres(exit_class)
                self.reverts += 1

    # Updates after a frame.

    def record(self, class_id: int, confirmed: bool, semantics=None, ran: int = 0,
               confidence: float = 1.0) -> None:
        """Records a frame's answer.

        Args:
          class_id: the answer.
          confirmed: True when the full model gave it (head or verification).
          semantics: `[S, D]` semantic vectors of the frame, valid for the
            first `ran` stages (those that ran); they feed the short-term
            tier, and when all stages ran and the full model confirmed a
            cached class, centre adaptation.
          ran: stages that ran for this frame.
          confidence: the full model's top probability, for confirmed answers.
        """
        if (self.slots and ran and confirmed
                and confidence >= self.policy.instance_min_confidence):
            self._remember(class_id, semantics, ran)
        if confirmed:
            self.exit_run = 0
        if not self.use_cache:
            return
        p = self.policy
        scores, hot = self.scores, self.hot
        self.last_hit = bool(hot[class_id])
        if not self.last_hit and scores[class_id] >= p.hot_min:
            self.left_out[class_id] += 1  # It qualified but the cache was full.
        self.answers[class_id] += 1
        scores *= p.decay
        if not confirmed:
            scores[class_id] += p.exit_weight
        elif confidence >= p.admit_min_confidence:
            scores[class_id] += 1.0
        if self.adapting and confirmed and ran == self.num_stages and hot[class_id]:
            self._adapt(class_id, semantics)
        self.frame_in_window += 1
        if self.frame_in_window >= p.window:
            self._resize()
        self._refresh()

    def _refresh(self) -> None:
        # Runs every frame: few numpy calls on K classes, Python for the few
        # cached ones.
        p, scores, hot = self.policy, self.scores, self.hot
        np.greater_equal(scores, p.hot_min, out=hot)
        cached = hot.nonzero()[0]
        if len(cached) > self.capacity:
            keep = np.argsort(-scores, kind="stable")[:self.capacity]
            hot[:] = False
            hot[keep] = True
            cached = np.sort(keep)
        if self.shifting:
            # Log-odds of recent answers, each score smoothed by 1/K (one
            # frame spread evenly over the classes).
            k = self.num_classes
            if self._contrast:
                outside = k - len(cached)
                rest = float(scores.sum()) - float(scores[cached].sum()) if outside else 0.0
                base = rest / max(outside, 1) + 1.0 / k
            else:
                base = (float(scores.sum()) + 1.0) / k
            shift = self.shift
            shift[:] = 0.0
            for c in cached.tolist():
                evidence = math.log((float(scores[c]) + 1.0 / k) / base)
                if evidence > 0.0:
                    shift[c] = p.prior_weight * evidence

    def _resize(self) -> None:
        p = self.policy
        left_out = self.left_out
        if left_out.sum() >= p.grow_after:
            self.capacity = min(p.max_hot, self.capacity + int(np.count_nonzero(left_out)))
        elif (self.hot & (self.answers == 0)).any():
            self.capacity = max(p.min_hot, self.capacity - 1)
        self.frame_in_window = 0
        left_out[:] = 0
        self.answers[:] = 0

    def _remember(self, class_id: int, semantics, ran: int) -> None:
        slots, nxt, count = self.slots, self.inst_next, self.inst_count
        for s in range(ran):
            k = nxt[s]
            self.inst[s, k] = semantics[s]
            self.inst_class[s, k] = class_id
            nxt[s] = (k + 1) % slots
            if count[s] < slots:
                count[s] += 1

    def _adapt(self, class_id: int, semantics) -> None:
        p = self.policy
        offset = self.offsets[:, class_id]
        semantics = np.asarray(semantics, np.float32).reshape(self.original[:, class_id].shape)
        offset += p.adapt_rate * (semantics - self.original[:, class_id] - offset)
        norm = np.sqrt((offset * offset).sum(axis=1, keepdims=True))
        np.multiply(offset, np.minimum(1.0, p.max_drift / np.maximum(norm, 1e-12)), out=offset)
        moved = self.original[:, class_id] + offset
        self.centres[:, class_id] = moved / np.sqrt((moved * moved).sum(axis=1, keepdims=True))
        self.adapted[class_id] = True

    # Persistence.

    def to_arrays(self) -> dict[str, np.ndarray]:
        """The state as named arrays (for `SmtmRuntime.save_state`)."""
        return {
            "scores": self.scores, "hot": self.hot, "capacity": np.int64(self.capacity),
            "frame_in_window": np.int64(self.frame_in_window), "left_out": self.left_out,
            "answers": self.answers, "inst": self.inst, "inst_class": self.inst_class,
            "inst_pos": np.array([self.inst_count, self.inst_next], np.int64).T,
            "offsets": self.offsets, "adapted": self.adapted,
            # Saturated at the bound `from_arrays` accepts, so a saved state
            # always restores (reached only from a restored state at the bound).
            "counters": np.minimum(np.array([self.exits, self.checks, self.disagreements,
                                             self.reverts, self.exit_run], np.int64),
                                   _MAX_COUNT),
        }

    def from_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        """Restores `to_arrays` output; raises ValueError if it does not fit."""
        expected = self.to_arrays()
        missing = sorted(set(expected) - set(arrays))
        if missing:
            raise ValueError(f"state arrays {missing} are missing.")
        for name, value in expected.items():
            got = np.asarray(arrays[name])
            if got.shape != np.shape(value):
                raise ValueError(f"state array {name!r} has shape {got.shape}, this model "
                                 f"needs {np.shape(value)}.")
            # Checked as the memory will hold it: 1e300 is finite in float64
            # and infinite once stored in a float32 array.
            dtype = np.asarray(value).dtype
            with np.errstate(over="ignore", invalid="ignore"):
                stored = got.astype(dtype if dtype.kind == "f" else np.float64)
            if not np.isfinite(stored).all():
                raise ValueError(f"state array {name!r} holds non-finite values "
                                 f"(as {stored.dtype}).")
        capacity = int(arrays["capacity"])
        count, nxt = (list(int(v) for v in col) for col in np.asarray(arrays["inst_pos"]).T)
        classes = np.asarray(arrays["inst_class"])
        p = self.policy
        if not p.min_hot <= capacity <= max(p.min_hot, p.max_hot):
            raise ValueError(f"capacity {capacity} is outside [{p.min_hot}, {p.max_hot}].")
        if not all(0 <= c <= self.slots and 0 <= n < max(self.slots, 1)
                   and ((classes[s, :c] >= 0) & (classes[s, :c] < self.num_classes)).all()
                   for s, (c, n) in enumerate(zip(count, nxt))):
            raise ValueError("the short-term tier's slots do not fit this model.")
        # The tier holds unit-norm semantic vectors: a longer one would match
        # any frame above the instance threshold.
        inst = np.asarray(arrays["inst"], np.float32)
        with np.errstate(over="ignore"):
            if (np.sqrt((inst * inst).sum(axis=-1)) > 1.0 + 1e-4).any():
                raise ValueError("the short-term tier holds vectors longer than 1.")
        # A score is a decayed sum of at most 1 per frame.
        top = 1.0 / (1.0 - p.decay) + 1e-6
        scores = np.asarray(arrays["scores"], np.float64)
        if ((scores < 0) | (scores > top)).any():
            raise ValueError(f"class scores must be in [0, {top:.6g}].")
        if any((np.asarray(arrays[name]) > p.window).any() for name in ("answers", "left_out")):
            raise ValueError(f"answer and left-out counts exceed the window ({p.window}).")
        if (np.asarray(arrays["counters"], np.float64) > _MAX_COUNT).any():
            # Counting on from int64's top would overflow when the state is saved.
            raise ValueError(f"exit counters must be <= {_MAX_COUNT}.")
        frame_in_window = int(arrays["frame_in_window"])
        if not 0 <= frame_in_window < p.window:
            raise ValueError(f"frame_in_window {frame_in_window} is outside [0, {p.window}).")
        if any((np.asarray(arrays[name]) < 0).any()
               for name in ("answers", "left_out", "counters")):
            raise ValueError("answer, left-out and exit counters must be >= 0.")
        offsets = np.asarray(arrays["offsets"], np.float32)
        with np.errstate(over="ignore"):
            if (np.sqrt((offsets * offsets).sum(axis=-1)) > p.max_drift + 1e-4).any():
                raise ValueError("an adapted centre lies further than max_drift from its "
                                 "original.")
        self.scores[:] = arrays["scores"]
        self.hot[:] = arrays["hot"]
        self.capacity = capacity
        self.frame_in_window = frame_in_window
        self.left_out[:] = arrays["left_out"]
        self.answers[:] = arrays["answers"]
        self.inst[:] = inst
        self.inst_class[:] = classes
        self.inst_count, self.inst_next = count, nxt
        self.exits, self.checks, self.disagreements, self.reverts, self.exit_run = (
            int(v) for v in arrays["counters"])
        self.revert_centres()
        for c in np.flatnonzero(np.asarray(arrays["adapted"], bool)):
            self.offsets[:, c] = offsets[:, c]
            moved = self.original[:, c] + offsets[:, c]
            self.centres[:, c] = moved / np.sqrt((moved * moved).sum(axis=1, keepdims=True))
            self.adapted[c] = True
        self._refresh()
