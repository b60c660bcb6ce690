"""Stage planning: where a Keras CNN can be cut into a chain of stage models.

A cut point is a layer whose output is the only tensor that carries anything
from the layers before it to the layers after it (e.g. the output of a
residual stage, but not a point inside a block, where the shortcut is also
live). Stages are chosen among the spatial (rank-4) cut points, spread over the
model's compute; what follows the last stage is the classifier head.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from smtm_tf import kerascompat


class StagePlanError(ValueError):
    """Raised when a model cannot be split as asked."""


@dataclasses.dataclass(frozen=True)
class CutPoint:
    """A layer after which a single tensor carries the model forward."""

    layer: str
    cumulative_cost: float  # Fraction of the model's multiply-adds before the cut.
    shape: tuple[int, ...]  # Output shape without the batch axis.


@dataclasses.dataclass(frozen=True)
class StagePlan:
    """Where the stages of a model end.

    Attributes:
      cut_layers: name of the layer that ends each stage, in order.
      stage_costs: each stage's share of the model's multiply-adds.
      head_cost: share of the multiply-adds after the last stage.
    """

    cut_layers: tuple[str, ...]
    stage_costs: tuple[float, ...]
    head_cost: float

    def __post_init__(self):
        if not self.cut_layers:
            raise StagePlanError("A stage plan needs at least one cut layer.")
        if len(self.stage_costs) != len(self.cut_layers):
            raise StagePlanError(
                f"stage_costs has {len(self.stage_costs)} entries for "
                f"{len(self.cut_layers)} cut layers.")

    @property
    def num_stages(self) -> int:
        return len(self.cut_layers)

    @property
    def cumulative_costs(self) -> tuple[float, ...]:
        return tuple(float(c) for c in np.cumsum(self.stage_costs))

    def to_dict(self) -> dict:
        return {"cut_layers": list(self.cut_layers),
                "stage_costs": list(self.stage_costs), "head_cost": self.head_cost}

    @classmethod
    def from_dict(cls, d: dict) -> "StagePlan":
        return cls(tuple(d["cut_layers"]), tuple(float(c) for c in d["stage_costs"]),
                   float(d["head_cost"]))


def _as_list(x) -> list:
    if x is None:
        return []
    return list(x) if isinstance(x, (list, tuple)) else [x]


def _shape(t) -> tuple:
    return tuple(t.shape)


def _layer_macs(layer) -> float:
    """Multiply-adds of one call of `layer`, from its weights and output shape.

    Only layers with weights that multiply (convolutions, dense) count; the
    element-wise rest is negligible next to them and would blur cut choices.
    """
    out = _as_list(layer.output)[0]
    out_shape = _shape(out)
    kernels = [w for w in layer.weights if len(w.shape) >= 2]
    if not kernels:
        return 0.0
    kernel = kernels[0]
    kshape = tuple(int(d) for d in kernel.shape)
    name = type(layer).__name__
    spatial = float(np.prod([d for d in out_shape[1:-1] if d is not None] or [1]))
    if name.startswith("DepthwiseConv"):
        # kernel [kh, kw, in, multiplier]; one product per output element and tap.
        return spatial * kshape[0] * kshape[1] * kshape[2] * kshape[3]
    # Conv kernels [kh, kw, in, out] and dense kernels [in, out] alike: each
    # output position costs prod(kernel) multiply-adds.
    return spatial * float(np.prod(kshape))


def check_supported(model) -> None:
    """Raises StagePlanError unless `model` is a single-input, single-output
    Sequential or functional Keras model."""
    flavour = kerascompat.flavour_of(model)
    if flavour is None:
        raise StagePlanError(
            f"{type(model).__name__} is not a Keras model. smtm_tf splits "
            "Sequential and functional models from Keras 3 or tf_keras.")
    if not kerascompat.is_graph_model(model):
        raise StagePlanError(
            f"{type(model).__name__} is a subclassed Keras model, whose layer graph "
            "cannot be read. smtm_tf supports Sequential and functional models: "
            "rebuild it with the functional API (keras.Input(...) ... keras.Model).")
    try:
        inputs, outputs = model.inputs, model.outputs
    except (AttributeError, ValueError) as e:
        raise StagePlanError(
            "The model has no defined input yet; build it with an Input layer "
            f"(or call it once) before planning stages ({e}).") from e
    if not inputs or len(inputs) != 1:
        raise StagePlanError(
            f"The model has {len(inputs or [])} inputs; smtm_tf supports "
            "single-input image classifiers.")
    if len(outputs) != 1:
        raise StagePlanError(
            f"The model has {len(outputs)} outputs; smtm_tf supports "
            "single-output classifiers (class probabilities or logits).")


def find_cut_points(model) -> list[CutPoint]:
    """Lists every layer after which a single tensor carries the model forward.

    Returns:
      Cut points in execution order, with their cumulative compute share and
      output shape. The model's input itself is not a cut point.
    """
    check_supported(model)
    layers = [layer for layer in model.layers if not kerascompat.is_input_layer(layer)]
    model_input = model.inputs[0]
    producer = {id(model_input): -1}
    tensors = {id(model_input): model_input}
    for i, layer in enumerate(layers):
        for t in _as_list(layer.output):
            producer[id(t)] = i
            tensors[id(t)] = t
    last_use = {}
    for i, layer in enumerate(layers):
        for t in _as_list(layer.input):
            if id(t) not in producer:
                raise StagePlanError(
                    f"Layer {layer.name!r} reads a tensor produced outside the "
                    "model's layer list (a shared or nested sub-graph); smtm_tf "
                    "cannot cut such a model.")
            last_use[id(t)] = max(last_use.get(id(t), -1), i)
    for t in model.outputs:
        last_use[id(t)] = len(layers)

    macs = np.array([_layer_macs(layer) for layer in layers], dtype=np.float64)
    total = macs.sum()
    if total <= 0:
        raise StagePlanError("The model has no convolution or dense layers to split.")
    cumulative = np.cumsum(macs) / total

    cuts = []
    for i, layer in enumerate(layers[:-1]):
        live = [tid for tid, p in producer.items()
                if p <= i and last_use.get(tid, -1) > i]
        outs = _as_list(layer.output)
        if len(live) == 1 and len(outs) == 1 and live[0] == id(outs[0]):
            shape = tuple(int(d) for d in _shape(outs[0])[1:])
            cuts.append(CutPoint(layer.name, float(cumulative[i]), shape))
    return cuts


def plan_stages(model, num_stages: int = 4,
                cut_layers: list[str] | tuple[str, ...] | None = None) -> StagePlan:
    """Chooses where each stage ends.

    Args:
      model: a Sequential or functional Keras model (Keras 3 or tf_keras).
      num_stages: how many stages to make when `cut_layers` is not given.
      cut_layers: explicit names of the layers that end each stage.

    Returns:
      The stage plan.

    Raises:
      StagePlanError: for unsupported models, unknown or invalid cut layers, or
        a model with fewer cut points than stages asked for.
    """
    cuts = find_cut_points(model)
    by_name = {c.layer: c for c in cuts}
    if cut_layers:
        names = [layer.name for layer in model.layers]
        chosen = []
        for name in cut_layers:
            if name not in names:
                raise StagePlanError(f"No layer named {name!r} in the model.")
            if name not in by_name:
                raise StagePlanError(
                    f"Layer {name!r} is not a cut point: other tensors besides its "
                    "output carry the model forward there (e.g. a residual "
                    "shortcut). Valid cut layers: "
                    + ", ".join(c.layer for c in cuts))
            if len(by_name[name].shape) != 3:
                raise StagePlanError(
                    f"Layer {name!r} outputs shape {by_name[name].shape}, not a feature map "
                    "[H, W, C]: stages must end on spatial layers (the encoders pool "
                    "over H and W). Valid spatial cut layers: "
                    + ", ".join(c.layer for c in cuts if len(c.shape) == 3))
            chosen.append(by_name[name])
        order = [c.layer for c in cuts]
        if [order.index(c.layer) for c in chosen] != sorted(
                order.index(c.layer) for c in chosen) or len(set(cut_layers)) != len(
                    cut_layers):
            raise StagePlanError(
                f"cut_layers {list(cut_layers)} must be distinct and in execution order.")
    else:
        if num_stages < 1:
            raise StagePlanError(f"num_stages must be >= 1, got {num_stages}.")
        spatial = [c for c in cuts if len(c.shape) == 3]
        # Cuts that add no compute after the previous one (BatchNorm, ReLU)
        # describe the same point: keep the latest, after the activation.
        distinct = []
        for c in spatial:
            if distinct and abs(c.cumulative_cost - distinct[-1].cumulative_cost) < 1e-9:
                distinct[-1] = c
            else:
                distinct.append(c)
        distinct = [c for c in distinct if c.cumulative_cost > 0]
        if len(distinct) < num_stages:
            raise StagePlanError(
                f"The model has {len(distinct)} spatial cut points "
                f"({[c.layer for c in distinct]}), fewer than num_stages="
                f"{num_stages}. Ask for fewer stages or name cut_layers.")
        last = distinct[-1]
        total_backbone = last.cumulative_cost
        chosen = []
        pool = distinct[:-1]
        for s in range(1, num_stages):
            target = total_backbone * s / num_stages
            remaining_needed = num_stages - 1 - s
            usable = pool[:len(pool) - remaining_needed] if remaining_needed else pool
            best = min(usable, key=lambda c: abs(c.cumulative_cost - target))
            chosen.append(best)
            pool = pool[pool.index(best) + 1:]
        chosen.append(last)
    cum = [c.cumulative_cost for c in chosen]
    stage_costs = tuple(float(b - a) for a, b in zip([0.0] + cum[:-1], cum))
    return StagePlan(tuple(c.layer for c in chosen), stage_costs, float(1.0 - cum[-1]))


def split_model(model, plan: StagePlan):
    """Builds the stage sub-models and the head; weights are shared with `model`.

    Returns:
      (stage_models, head_model): stage i maps the previous stage's output (the
      image for stage 0) to the output of `plan.cut_layers[i]`; the head maps
      the last stage's output to the model's output.
    """
    k = kerascompat.keras_of(model)
    boundaries = [model.inputs[0]] + [
        _as_list(model.get_layer(n).output)[0] for n in plan.cut_layers]
    stages = [k.Model(boundaries[i], boundaries[i + 1], name=f"stage_{i}")
              for i in range(plan.num_stages)]
    head = k.Model(boundaries[-1], model.outputs[0], name="head")
    return stages, head


def check_chain(model, stage_models, head_model, x: np.ndarray,
                atol: float = 1e-5) -> float:
    """Checks that the chain of stage models reproduces the model's output.

    Returns:
      The largest absolute difference seen.

    Raises:
      StagePlanError: when it exceeds `atol`.
    """
    want = np.asarray(model(x, training=False))
    a = x
    for stage in stage_models:
        a = stage(a, training=False)
    got = np.asarray(head_model(a, training=False))
    diff = float(np.max(np.abs(want - got)))
    if not diff <= atol:
        raise StagePlanError(
            f"The stage chain differs from the model by {diff:.3g} (> {atol}); the "
            "cut layers do not split the model cleanly.")
    return diff
