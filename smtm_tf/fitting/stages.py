"""Stage planning: where a Keras CNN can be cut into a chain of stage models.

A cut point is a layer whose output is the only tensor that carries anything
from the layers before it to the layers after it (e.g. the output of a
residual stage, but not a point inside a block, where the shortcut is also
live). Stages are chosen among the spatial (rank-4) cut points before global
pooling, as evenly over the model's compute as those points allow; what
follows the last stage (the rest of the backbone, then the classifier) is the
head, and it counts as one more share: an exit after the whole backbone would
save only the classifier (about 1% of a ResNet or MobileNet) while its stage
still pays for an encoder. `explain_plan` says what each stage holds and why
one stays larger than the others.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from smtm_tf.fitting import kerascompat

# Stages planned when neither a number nor cut layers are given (fewer on a
# model with fewer spatial cut points). The converter then keeps those whose
# exits pay for their measured time (`priced_by_time`). Six planned stages
# against four, each then priced so (2026-12-04, zoo, Python video speed-up):
# VGG 1.78 -> 2.36x (a first stage of 4% of the compute where 65% of the
# frames exit), DenseNet 1.88 -> 2.00x, the inception-style net 1.67 ->
# 1.80x; on MobileNetV2 0.35 all six kept cost more than they saved (1.60 ->
# 1.43x), which the time-priced drop is for (docs/model_zoo.md).
DEFAULT_NUM_STAGES = 6


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
    """The tensors in `x` (one tensor, or nested lists, tuples and dicts of them)."""
    if x is None:
        return []
    if isinstance(x, dict):
        x = list(x.values())
    if isinstance(x, (list, tuple)):
        return [t for item in x for t in _as_list(item)]
    return [x]


def _shape(t) -> tuple:
    return tuple(t.shape)


def _size(variable) -> float:
    return float(np.prod([int(d) for d in variable.shape]))


def _positions(shape: tuple) -> float:
    """Positions a layer computes: the product of the axes between batch and channels."""
    return float(np.prod([d for d in shape[1:-1] if d is not None] or [1]))


def _layer_macs(layer) -> float:
    """Multiply-adds of one call of `layer`, from its kernels and output shape.

    Counts the layers whose weights multiply activations: convolutions (grouped,
    depthwise, separable, transposed) and dense layers. The element-wise rest
    (BatchNorm, activations, adds, pooling, Normalization's mean and variance)
    is small next to them and would blur cut choices.
    """
    outputs = _as_list(getattr(layer, "output", None))
    if not outputs:
        return 0.0
    positions = _positions(_shape(outputs[0]))
    depthwise = getattr(layer, "depthwise_kernel", None)
    pointwise = getattr(layer, "pointwise_kernel", None)
    if depthwise is not None:
        # Separable: a depthwise [kh, kw, in, multiplier] then a pointwise
        # [1, 1, in * multiplier, out] convolution, both at every output
        # position (strides apply to the depthwise step). tf_keras's
        # DepthwiseConv2D keeps its kernel here too, without a pointwise one.
        return positions * (_size(depthwise) + (0.0 if pointwise is None else _size(pointwise)))
    kernel = getattr(layer, "kernel", None)
    if kernel is None or len(kernel.shape) < 2:
        return 0.0
    if "Transpose" in type(layer).__name__:
        # Kernel [kh, kw, out, in]: every input position is spread over kh * kw * out outputs.
        return _positions(_shape(_as_list(layer.input)[0])) * _size(kernel)
    # Conv [kh, kw, in / groups, out], Keras 3 depthwise [kh, kw, in, multiplier]
    # and dense [in, out] kernels alike: each output position costs prod(kernel).
    return positions * _size(kernel)


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


@dataclasses.dataclass(frozen=True)
class _Graph:
    """The model's operations in execution order, their compute and liveness.

    Attributes:
      nodes: layers and, in Keras 3, raw operations (`x + 3.0`, `ops.multiply`)
        in a topological order; the input layer is left out.
      macs: multiply-adds of each node.
      cumulative: share of the model's multiply-adds up to each node, included.
      live_after: ids of the tensors still to be read after each node.
      producer: tensor id -> index of the node that makes it (-1: the input).
      last_use: tensor id -> index of the last node that reads it (len(nodes):
        the model's output).
      cuts: the cut points.
    """

    nodes: tuple
    macs: np.ndarray
    cumulative: np.ndarray
    live_after: tuple[frozenset, ...]
    producer: dict
    last_use: dict
    cuts: tuple[CutPoint, ...]

    def node_name(self, index: int) -> str:
        return "the input" if index < 0 else repr(self.nodes[index].name)


def _analyse(model) -> _Graph:
    check_supported(model)
    # A Keras 3 functional model lists raw operations only in `operations`;
    # they read and make tensors like layers do, so liveness must see them.
    ops = getattr(model, "operations", None)
    nodes = [n for n in (model.layers if ops is None else ops)
             if not kerascompat.is_input_layer(n)]
    model_input = model.inputs[0]
    producer = {id(model_input): -1}
    outputs, inputs = [], []
    for i, node in enumerate(nodes):
        outputs.append(_as_list(node.output))
        inputs.append(_as_list(node.input))
        for t in outputs[-1]:
            producer[id(t)] = i
    last_use = {}
    for i, node in enumerate(nodes):
        for t in inputs[i]:
            if id(t) not in producer:
                raise StagePlanError(
                    f"Layer {node.name!r} reads a tensor produced outside the "
                    "model's layer list (a shared or nested sub-graph); smtm_tf "
                    "cannot cut such a model.")
            last_use[id(t)] = i
    for t in model.outputs:
        last_use[id(t)] = len(nodes)

    macs = np.array([_layer_macs(n) for n in nodes], dtype=np.float64)
    total = macs.sum()
    if total <= 0:
        raise StagePlanError("The model has no convolution or dense layers to split.")
    cumulative = np.cumsum(macs) / total

    # One sweep: a tensor is live after node i from its making until its last reader.
    ending = {}
    for tid, i in last_use.items():
        ending.setdefault(i, []).append(tid)
    live = {id(model_input)} if id(model_input) in last_use else set()
    live_after, cuts = [], []
    for i, node in enumerate(nodes):
        live.update(id(t) for t in outputs[i] if last_use.get(id(t), -1) > i)
        live.difference_update(ending.get(i, ()))
        live_after.append(frozenset(live))
        outs = outputs[i]
        # A raw operation can end a stage too: Keras 3 ConvNeXt's residual
        # adds (`x + shortcut`) are the only points inside its stages.
        if i < len(nodes) - 1 and len(outs) == 1 and live == {id(outs[0])}:
            shape = tuple(int(d) for d in _shape(outs[0])[1:])
            cuts.append(CutPoint(node.name, float(cumulative[i]), shape))
    return _Graph(tuple(nodes), macs, cumulative, tuple(live_after), producer, last_use,
                  tuple(cuts))


def find_cut_points(model) -> list[CutPoint]:
    """Lists every layer (or Keras 3 raw operation) after which a single tensor
    carries the model forward.

    Returns:
      Cut points in execution order, with their cumulative compute share and
      output shape. The model's input itself is not a cut point.
    """
    return list(_analyse(model).cuts)


def _node(model, name: str):
    """The layer, or (Keras 3) raw operation, of that name."""
    for node in getattr(model, "operations", None) or model.layers:
        if node.name == name:
            return node
    raise StagePlanError(f"No layer or operation named {name!r} in the model.")


def _is_padding(layer) -> bool:
    return type(layer).__name__.startswith("ZeroPadding")


def _stage_candidates(model, cuts) -> list[CutPoint]:
    """The spatial cut points a plan chooses from, one per distinct compute share.

    They end before the first cut at a global pooling layer: after it the
    model is its classifier head, even where it keeps [1, 1, C] maps
    (MobileNetV3's 1x1 convolutions after pooling with keepdims).
    """
    backbone = []
    for c in cuts:
        if type(_node(model, c.layer)).__name__.startswith("Global"):
            break
        backbone.append(c)
    distinct = []
    for c in (c for c in backbone if len(c.shape) == 3):
        if distinct and abs(c.cumulative_cost - distinct[-1].cumulative_cost) < 1e-9:
            # Cuts that add no compute after the previous one (BatchNorm, ReLU)
            # describe the same point: keep the latest, after the activation,
            # but not a ZeroPadding, whose zeros only the next convolution wants.
            if not _is_padding(_node(model, c.layer)):
                distinct[-1] = c
        else:
            distinct.append(c)
    return [c for c in distinct if c.cumulative_cost > 0]


def _balanced_ends(cumulative: np.ndarray, num_stages: int) -> list[int]:
    """The stage ends that make the most even stages, by dynamic programming.

    Args:
      cumulative: increasing compute shares at the candidate ends; the last
        one ends the last stage.
      num_stages: stages to make, at most len(cumulative).

    Returns:
      Indices into `cumulative`: of all choices, those whose largest stage is
      the smallest and, among them, whose sum of squared stage shares (so
      squared deviation from equal shares) is the smallest.
    """
    c = np.concatenate([[0.0], np.asarray(cumulative, np.float64)])
    m = len(c)
    share = c[None, :] - c[:, None]  # [previous end, end]; index 0 is the input.
    later = np.triu(np.ones((m, m), bool), 1)
    # worst[j]: the smallest possible largest stage of s stages ending at j.
    worst = np.where(later[0], share[0], np.inf)
    for _ in range(1, num_stages):
        worst = np.where(later, np.maximum(worst[:, None], share), np.inf).min(axis=0)
    bound = worst[-1] + 1e-12
    allowed = later & (share <= bound)
    squares = np.where(allowed, share * share, np.inf)
    total = squares[0].copy()
    back = []
    for _ in range(1, num_stages):
        options = total[:, None] + squares
        back.append(options.argmin(axis=0))
        total = options[back[-1], np.arange(m)]
    ends = [m - 1]
    for previous in reversed(back):
        ends.append(int(previous[ends[-1]]))
    return [e - 1 for e in reversed(ends)]


def plan_stages(model, num_stages: int | None = None,
                cut_layers: list[str] | tuple[str, ...] | None = None) -> StagePlan:
    """Chooses where each stage ends.

    Without `cut_layers`, the stages end among all spatial cut points so that
    of the num_stages + 1 shares (the stages, then the head: what follows the
    last stage) the largest is as small as it can be, then the shares are as
    even as they can be. Where the classifier alone outweighs an even share
    (MobileNetV3's 1x1 convolutions after pooling), the last stage ends at the
    last spatial cut point. `explain_plan` says why a stage stays larger than
    the others.

    Args:
      model: a Sequential or functional Keras model (Keras 3 or tf_keras).
      num_stages: how many stages to make when `cut_layers` is not given;
        None: DEFAULT_NUM_STAGES, or one per spatial cut point where the
        model has fewer (NASNet's cells each take the two cells before, so
        only its stem and its last cell end at a single tensor).
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
        names = [n.name for n in getattr(model, "operations", None) or model.layers]
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
        distinct = _stage_candidates(model, cuts)
        if num_stages is None:
            if not distinct:
                raise StagePlanError(
                    "The model has no spatial cut point: after no layer does a single "
                    "feature map [H, W, C] carry it forward, so it cannot be split into "
                    "stages.")
            num_stages = min(DEFAULT_NUM_STAGES, len(distinct))
        if num_stages < 1:
            raise StagePlanError(f"num_stages must be >= 1, got {num_stages}.")
        if len(distinct) < num_stages:
            raise StagePlanError(
                f"The model has {len(distinct)} spatial cut points "
                f"({[c.layer for c in distinct]}), fewer than num_stages="
                f"{num_stages}. Ask for fewer stages or name cut_layers.")
        # The whole model (1.0) ends the last share, the head's.
        ends = _balanced_ends(np.array([c.cumulative_cost for c in distinct] + [1.0]),
                              num_stages + 1)
        chosen = [distinct[e] for e in ends[:-1]]
    cum = [c.cumulative_cost for c in chosen]
    stage_costs = tuple(float(b - a) for a, b in zip([0.0] + cum[:-1], cum))
    return StagePlan(tuple(c.layer for c in chosen), stage_costs, float(1.0 - cum[-1]))


def keep_stages(plan: StagePlan, keep) -> StagePlan:
    """`plan` with only the stages `keep` (indices, in order): a dropped
    stage's compute joins the next kept stage, or the head after the last."""
    keep = sorted(set(int(k) for k in keep))
    if not keep or keep[0] < 0 or keep[-1] >= plan.num_stages:
        raise StagePlanError(f"Cannot keep stages {keep} of {plan.num_stages}.")
    bounds = [0] + [k + 1 for k in keep]
    costs = tuple(float(sum(plan.stage_costs[a:b])) for a, b in zip(bounds[:-1], bounds[1:]))
    return StagePlan(tuple(plan.cut_layers[k] for k in keep), costs,
                     float(plan.head_cost + sum(plan.stage_costs[bounds[-1]:])))


def expected_cost(exit_shares, plan: StagePlan, overhead: float, keep=None) -> float:
    """A frame's expected cost as a share of the full model's, from where frames exit.

    Args:
      exit_shares: per stage of `plan`, the share of frames that exit there
        (the rest run the head).
      plan: the stage plan.
      overhead: what running a stage costs besides its layers (its encoder,
        handing its activation on, the runtime's lookup), as a share of the
        full model.
      keep: the stages kept (default: all). Frames that exited at a dropped
        stage are counted as exiting at the next kept one, or running the
        head after the last: an estimate, since no rule was calibrated for
        the kept stages alone.
    """
    keep = range(plan.num_stages) if keep is None else sorted(keep)
    kept = keep_stages(plan, keep)
    shares = np.asarray(exit_shares, np.float64)
    bounds = [0] + [k + 1 for k in keep]
    exits = np.array([shares[a:b].sum() for a, b in zip(bounds[:-1], bounds[1:])])
    exits = np.append(exits, 1.0 - exits.sum())  # The rest run the head.
    reach = 1.0 - np.concatenate([[0.0], np.cumsum(exits[:-2])])  # Per kept stage.
    # A frame that runs the head pays every stage and the head (1 in
    # multiply-adds; a plan priced by time may differ).
    costs = np.append(np.cumsum(kept.stage_costs), sum(kept.stage_costs) + kept.head_cost)
    return float(exits @ costs + overhead * reach.sum())


def priced_by_time(plan: StagePlan, stages_us, head_us: float,
                   full_us: float) -> tuple[StagePlan, float]:
    """`plan` priced in measured time instead of multiply-adds, and a stage's overhead.

    What a frame's signatures cost beyond `full` (the chain's time minus
    `full`'s) is each stage's overhead: its encoder, the hand-over, the call;
    spread evenly over the stages. A stage then costs its time less that
    overhead, the head its time, both as shares of `full`, so that
    `expected_cost` of the priced plan gives a frame's time over `full`'s
    for every choice of kept stages.

    Args:
      plan: the stage plan the times were measured on.
      stages_us: each stage signature's time inside the chain (as
        `converters.stage_times` measures it), in microseconds.
      head_us: the head's time after the last stage.
      full_us: the full model's time.

    Returns:
      (priced plan, overhead as a share of `full`).
    """
    stages_us = [float(t) for t in stages_us]
    if len(stages_us) != plan.num_stages or not full_us > 0:
        raise ValueError(f"priced_by_time needs {plan.num_stages} stage times and a "
                         f"positive full time, got {len(stages_us)} and {full_us}.")
    overhead = max(0.0, (sum(stages_us) + head_us - full_us) / plan.num_stages)
    costs = tuple(max(0.0, t - overhead) / full_us for t in stages_us)
    return (StagePlan(plan.cut_layers, costs, float(head_us) / full_us),
            overhead / full_us)


def stages_worth_keeping(exit_shares, plan: StagePlan, overhead: float) -> tuple[int, ...]:
    """The stages whose exits pay for their overhead (`expected_cost`'s terms).

    Drops, one at a time, the stage whose removal lowers the expected cost
    the most, while one does; at least one stage stays.
    """
    keep = list(range(plan.num_stages))
    best = expected_cost(exit_shares, plan, overhead, keep)
    while len(keep) > 1:
        cost, dropped = min((expected_cost(exit_shares, plan, overhead,
                                           [k for k in keep if k != d]), d) for d in keep)
        if cost >= best - 1e-9:
            break
        keep.remove(dropped)
        best = cost
    return tuple(keep)


# A stage is called unbalanced above this multiple of the even share.
_UNBALANCED = 1.2


def _span_reason(graph: _Graph, first: int, last: int) -> str:
    """Why no cut point lies between nodes `first` and `last` (execution indices)."""
    spanning = set().union(*graph.live_after[first:last])
    # The tensor live over most of the span is the shortcut or branch input.
    tid = max(spanning, key=lambda t: (min(graph.last_use.get(t, -1), last)
                                       - max(graph.producer[t], first), -graph.producer[t]))
    reader = graph.last_use.get(tid, len(graph.nodes))
    read_by = ("the model's output" if reader >= len(graph.nodes)
               else repr(graph.nodes[reader].name))
    return (f"the output of {graph.node_name(graph.producer[tid])} is still read by "
            f"{read_by} (a residual or branch spans them)")


def explain_plan(model, plan: StagePlan) -> list[str]:
    """Says how `plan` spreads the model's compute, and why a stage is larger.

    Args:
      model: the Keras model the plan was made for.
      plan: its stage plan.

    Returns:
      Lines to print: one per stage with its share and last layer, one for the
      head; then, for each stage holding over 1.2x the even share, why: a
      single layer that holds more than the even share, or the longest stretch
      with no single-tensor point (and the tensor that spans it), or that no
      other choice of cut points does better; where `plan_stages` would make
      a smaller largest stage, a line saying so; and a line when the head
      holds over 1.2x the even share although the last stage ends at the last
      spatial cut point (what is left cannot be staged).
    """
    graph = _analyse(model)
    candidates = _stage_candidates(model, graph.cuts)
    lines = [f"stage {s}: {100 * share:.1f}% of the compute, ends at {name!r}"
             for s, (share, name) in enumerate(zip(plan.stage_costs, plan.cut_layers))]
    lines.append(f"head: {100 * plan.head_cost:.1f}% of the compute, after "
                 f"{plan.cut_layers[-1]!r}")
    even = sum(plan.stage_costs) / plan.num_stages
    flagged = [s for s, share in enumerate(plan.stage_costs) if share > _UNBALANCED * even]
    auto = None
    if flagged:
        try:
            auto = plan_stages(model, plan.num_stages)
        except StagePlanError:
            pass
        if auto is not None and max(auto.stage_costs) >= max(plan.stage_costs) - 1e-6:
            auto = None  # No better plan than this one.
    index = {n.name: i for i, n in enumerate(graph.nodes)}
    spatial = [index[c.layer] for c in graph.cuts if len(c.shape) == 3]
    total = float(graph.macs.sum())
    ends = [index[name] for name in plan.cut_layers]
    starts = [-1] + ends[:-1]
    for s in flagged:
        start, end = starts[s], ends[s]
        head = f"stage {s} holds {100 * plan.stage_costs[s]:.1f}% (even: {100 * even:.1f}%)"
        # The stretches between consecutive spatial cut points inside the stage.
        bounds = [start] + [i for i in spatial if start < i < end] + [end]
        gap, a, b = max((float(graph.macs[a + 1:b + 1].sum()) / total, a, b)
                        for a, b in zip(bounds[:-1], bounds[1:]))
        weighted = [i for i in range(a + 1, b + 1) if graph.macs[i] > 0]
        if len(weighted) == 1:
            stretch = (f"the single layer {graph.node_name(weighted[0])} "
                       f"({100 * gap:.1f}% of the compute)")
        else:
            stretch = (f"no single-tensor point between {graph.node_name(a)} and "
                       f"{graph.node_name(b)} ({100 * gap:.1f}% of the compute): "
                       + _span_reason(graph, a + 1, b))
        heaviest = start + 1 + int(np.argmax(graph.macs[start + 1:end + 1]))
        heavy_share = float(graph.macs[heaviest]) / total
        if heavy_share > even:
            lines.append(f"{head}: layer {graph.nodes[heaviest].name!r} alone holds "
                         f"{100 * heavy_share:.1f}%")
        elif gap > even:
            lines.append(f"{head}: {stretch}")
        elif auto is None:
            lines.append(f"{head}: no choice of {plan.num_stages} among the "
                         f"{len(candidates)} spatial cut points "
                         f"makes the largest stage smaller; its longest stretch: {stretch}")
        else:
            lines.append(f"{head}: its ends are not plan_stages' (named by hand, or "
                         f"stages dropped after calibration); its longest stretch: {stretch}")
    if auto is not None:
        lines.append(
            f"plan_stages(num_stages={plan.num_stages}) makes the largest stage "
            f"{100 * max(auto.stage_costs):.1f}% instead, ending at "
            + ", ".join(repr(n) for n in auto.cut_layers))
    if plan.head_cost > _UNBALANCED * even and plan.cut_layers[-1] == candidates[-1].layer:
        lines.append(
            f"head holds {100 * plan.head_cost:.1f}%: it is not staged, as no spatial "
            f"[H, W, C] cut point before global pooling follows {plan.cut_layers[-1]!r}")
    return lines


def split_model(model, plan: StagePlan):
    """Builds the stage sub-models and the head; weights are shared with `model`.

    Returns:
      (stage_models, head_model): stage i maps the previous stage's output (the
      image for stage 0) to the output of `plan.cut_layers[i]`; the head maps
      the last stage's output to the model's output.
    """
    k = kerascompat.keras_of(model)
    boundaries = [model.inputs[0]] + [
        _as_list(_node(model, n).output)[0] for n in plan.cut_layers]
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
