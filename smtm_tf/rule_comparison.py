"""Compares exit rules on one converted model: metrics x budgets x streams.

Every rule is calibrated on the same held-out frames and measured with the
same harness on the same frames, so only the decision rule differs.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from smtm_tf import cache as cache_lib
from smtm_tf import encoders as enc
from smtm_tf import exit_policy
from smtm_tf import memory as memory_lib
from smtm_tf import stages as stages_lib
from smtm_tf import validation

# (name, metric, calibration): "global" is one threshold shared by all
# stages; "stage" is one per stage; "cache" adds the hot-class prior.
RULES = (
    ("top1 global", exit_policy.Metric.TOP1, "global"),
    ("margin global", exit_policy.Metric.MARGIN, "global"),
    ("margin per stage", exit_policy.Metric.MARGIN, "stage"),
    ("layer-aware", exit_policy.Metric.LAYER_AWARE, "stage"),
    ("layer-aware + cache", exit_policy.Metric.LAYER_AWARE, "cache"),
)


@dataclasses.dataclass(frozen=True)
class RuleResult:
    rule: str
    budget: float
    stream: str
    comparison: validation.Comparison


def fit_rules(model, memory: memory_lib.SemanticMemory, x_train: np.ndarray,
              x_calibration: np.ndarray, budgets, cache_policy=cache_lib.CachePolicy(),
              batch_size: int = 256) -> dict:
    """Calibrates every rule of RULES at every budget (points of agreement).

    Returns:
      {(rule name, budget): (ExitRule, cache policy or None)}.
    """
    stage_models, head = stages_lib.split_model(model, memory.plan)
    train = enc.extract_features(stage_models, head, x_train, memory.pooling, batch_size)
    calib = enc.extract_features(stage_models, head, x_calibration, memory.pooling,
                                 batch_size)
    sims, full = memory.similarities(calib), calib.predictions
    params = exit_policy.fit_layer_aware(memory.similarities(train), train.predictions)
    costs = memory.plan.stage_costs
    rules = {}
    for budget in budgets:
        target = exit_policy.budget_to_target(budget)
        for name, metric, kind in RULES:
            p = params if metric is exit_policy.Metric.LAYER_AWARE else None
            if kind == "global":
                rule, policy = exit_policy.calibrate_global(sims, full, costs, target,
                                                            metric), None
            elif kind == "stage":
                rule, policy = exit_policy.calibrate(sims, full, costs, target, metric=metric,
                                                     metric_params=p), None
            else:
                rule, policy = memory_lib.calibrate_rule(sims, full, costs, target, metric, p,
                                                         cache_policy), cache_policy
            rules[(name, budget)] = (rule, policy)
    return rules


def measure_rules(runtime, rules: dict, streams: dict, images: np.ndarray,
                  labels: np.ndarray) -> list[RuleResult]:
    """Runs each rule on each stream with the harness, side by side with `full`."""
    results = []
    try:
        for (name, budget), (rule, policy) in rules.items():
            runtime.set_exit_rule(rule, policy)
            for kind, stream in streams.items():
                c = validation.compare(runtime, images[stream.indices], labels[stream.indices])
                results.append(RuleResult(name, budget, kind, c))
    finally:
        runtime.set_exit_rule(runtime.descriptor.exit_rule, runtime.descriptor.cache)
    return results


def format_rule_table(results: list[RuleResult]) -> str:
    num_stages = len(results[0].comparison.smtm.exit_shares) - 1
    exits = " / ".join(f"s{s}" for s in range(num_stages))
    lines = [f"| budget | stream | rule | exits {exits} / head | top-1 drop | agree w/ full | "
             "speed-up |", "|---|---|---|---|---|---|---|"]
    for r in sorted(results, key=lambda r: (r.budget, r.stream)):
        c = r.comparison
        shares = " / ".join(f"{100 * s:.0f}" for s in c.smtm.exit_shares)
        lines.append(f"| {r.budget:g} | {r.stream} | {r.rule} | {shares} | "
                     f"{c.accuracy_drop:+.2f} | {100 * c.smtm.agreement:.2f}% | "
                     f"{c.speedup:.2f}x |")
    return "\n".join(lines)
