"""Compares exit rules on one converted model: metrics x budgets x streams.

Every rule is calibrated on the same held-out frames and measured with the
same harness on the same frames, so only the decision rule differs.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from smtm_tf.runtime import cache as cache_lib
from smtm_tf.fitting import encoders as enc
from smtm_tf.runtime import exit_policy
from smtm_tf.fitting import memory as memory_lib
from smtm_tf.fitting import stages as stages_lib
from smtm_tf.evaluation import validation

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
              batch_size: int = 256) -> tuple[dict, tuple]:
    """Calibrates every rule of RULES at every budget (points of agreement).

    Returns:
      ({(rule name, budget): (ExitRule, cache policy or None)}, (train,
      calibration) StageFeatures the rules were fitted on).
    """
    stage_models, head = stages_lib.split_model(model, memory.plan)
    train = enc.extract_features(stage_models, head, x_train, memory.pooling, batch_size)
    calib = enc.extract_features(stage_models, head, x_calibration, memory.pooling,
                                 batch_size)
    rules = {}
    sims, full = memory.similarities(calib), calib.predictions
    params = exit_policy.fit_layer_aware(memory.similarities(train), train.predictions)
    costs = memory.plan.stage_costs
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
    return rules, (train, calib)


def measure_rules(runtime, rules: dict, streams: dict, images: np.ndarray,
                  labels: np.ndarray) -> list[RuleResult]:
    """Runs each rule on each stream with the harness, side by side with `full`."""
    results = []
    try:
        for (name, budget), (rule, policy) in rules.items():
            runtime.set_exit_rule(rule, policy)
            for kind, stream in streams.items():
                c = validation.compare(runtime, stream.render(images), labels[stream.indices])
                results.append(RuleResult(name, budget, kind, c))
    finally:
        runtime.set_exit_rule(runtime.descriptor.exit_rule, runtime.descriptor.cache)
    return results


def format_rule_table(results: list[RuleResult], stage_costs) -> str:
    num_stages = len(results[0].comparison.smtm.exit_shares) - 1
    exits = " / ".join(f"s{s}" for s in range(num_stages))
    lines = [f"| budget | stream | rule | exits % {exits} / head | top-1 drop | agree w/ full | "
             "compute speed-up | measured speed-up |", "|---|---|---|---|---|---|---|---|"]
    for r in sorted(results, key=lambda r: (r.budget, r.stream)):
        c = r.comparison
        shares = " / ".join(f"{100 * s:.0f}" for s in c.smtm.exit_shares)
        lines.append(f"| {r.budget:g} | {r.stream} | {r.rule} | {shares} | "
                     f"{c.accuracy_drop:+.2f} | {100 * c.smtm.agreement:.2f}% | "
                     f"{exit_policy.compute_speedup(c.smtm.exit_shares, stage_costs):.2f}x | "
                     f"{c.speedup:.2f}x |")
    return "\n".join(lines)


def softmax_head_agreement(train: enc.StageFeatures, calib: enc.StageFeatures,
                           epochs: int = 10, seed: int = 0) -> tuple[float, ...]:
    """Per stage, the agreement with the full model of a softmax classifier
    trained on the same pooled features as the encoders (the yardstick for
    nearest-centre lookup)."""
    import tf_keras  # pylint: disable=import-outside-toplevel

    tf_keras.utils.set_random_seed(seed)
    out = []
    num_classes = train.probabilities.shape[1]
    for f_train, f_cal in zip(train.pooled, calib.pooled):
        mean, std = f_train.mean(0), f_train.std(0) + 1e-6
        head = tf_keras.Sequential([tf_keras.Input((f_train.shape[1],)),
                                    tf_keras.layers.Dense(num_classes, activation="softmax")])
        head.compile(tf_keras.optimizers.Adam(3e-3), "sparse_categorical_crossentropy")
        head.fit((f_train - mean) / std, train.predictions, epochs=epochs, batch_size=256,
                 verbose=0)
        pred = head.predict((f_cal - mean) / std, verbose=0, batch_size=1024).argmax(1)
        out.append(float((pred == calib.predictions).mean()))
    return tuple(out)


def lock_in_study(runtime, rule, policy: cache_lib.CachePolicy, stream, images, labels,
                  exit_weights=(1.0, 0.25, 0.0)) -> list[tuple[float, validation.Comparison]]:
    """The same calibrated rule with early exits counting more or less in the cache.

    With weight 1 a wrong exit feeds its own class into the cache as if the
    full model had confirmed it; the guard (the default 0.25) makes a class
    stay hot only while the full model keeps confirming it.
    """
    results = []
    try:
        for w in exit_weights:
            runtime.set_exit_rule(rule, dataclasses.replace(policy, exit_weight=w))
            results.append((w, validation.compare(runtime, stream.render(images),
                                                  labels[stream.indices])))
    finally:
        runtime.set_exit_rule(runtime.descriptor.exit_rule, runtime.descriptor.cache)
    return results
