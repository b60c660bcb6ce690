"""What each level of the adaptive memory adds: replayed exits on test streams.

Calibrates the memory's metric on held-out frames (the train tail, as the
converter does) with each level added in turn, runs the model's stages once
over each test stream's frames, and replays the semantic vectors through
`cache.MemoryState` with each variant. Each cell is the compute speed-up
(1 / mean compute share of the exit stage, verification included), the
agreement with the full model and the top-1 drop against it in points;
`scripts/validate.py` measures latency on the converted model.

Example:
  python scripts/memory_ablation.py --stream=scene_change,video,object --seed=11,12
  python scripts/memory_ablation.py --stream=object --seed=20,21,22,23,24,25,26,27,28,29
  python scripts/memory_ablation.py --stream=scene_change,video --ceiling

With --ceiling, two bounds on what a hot set can give on each stream are
printed as well, each against no hot set calibrated the same way (on the
test stream itself, so both are in-sample and optimistic):
  - the default memory calibrated on the test stream (the cache's own
    knowledge of the scene, thresholds fitted to this very stream);
  - an oracle that knows each scene's classes (those with at least 5% of the
    scene's frames, from the labels) and their shares: they are hot, and
    their prior is `prior_weight` times the log of their share over 1/K, at
    the best of four weights.
"""

from scripts import command_line  # First: quiets native logs before TensorFlow loads.

import dataclasses

import numpy as np
from absl import flags

from smtm_tf.runtime import cache
from smtm_tf.fitting import calibration
from smtm_tf.fitting import data as data_lib
from smtm_tf.fitting import encoders as enc
from smtm_tf.runtime import exit_policy
from smtm_tf.fitting import kerascompat
from smtm_tf.fitting import memory as memory_lib
from smtm_tf.fitting import stages as stages_lib
from smtm_tf.fitting import streams
from converters import smtm_converter

_MODEL = flags.DEFINE_string("model", "models/demo_resnet.keras", "Keras model.")
_MEMORY = flags.DEFINE_string("memory", None, "Its memory (default: next to the model).")
_STREAMS = flags.DEFINE_list("stream", ["scene_change", "video", "zipf", "uniform", "object",
                                        "drift"], "Stream kinds.")
_SEEDS = flags.DEFINE_list("seed", ["11", "12", "13"], "Stream seeds.")
_FRAMES = flags.DEFINE_integer("frames", 3000, "Frames per stream.")
_CEILING = flags.DEFINE_bool("ceiling", False, "Also print in-sample bounds on a hot set's "
                             "speed-up (see the module docstring).")


def scene_oracle(memory, sem, full, labels, scene_starts, costs):
    """Speed-up over no hot set when each scene's classes and shares are known.

    Both rules are calibrated on the stream itself; returns the best over the
    prior weights 0, 1/16, 1/8, 1/4.
    """
    rule, k = memory.exit_rule, memory.centres[0].shape[0]
    n = len(full)
    hot = np.zeros((n, k), bool)
    evidence = np.zeros((n, k), np.float32)
    bounds = list(scene_starts) + [n] if len(scene_starts) else [0, n]
    for start, end in zip(bounds[:-1], bounds[1:]):
        counts = np.bincount(labels[start:end], minlength=k)
        hot[start:end] = counts >= 0.05 * (end - start)
        share = (counts + 1.0 / k) / (end - start + 1.0)
        evidence[start:end] = np.where(hot[start], np.maximum(np.log(share * k), 0.0), 0.0)
    sims = [sem[s] @ c.T for s, c in enumerate(memory.centres)]
    cumulative = exit_policy.exit_costs(costs)
    plain = exit_policy.calibrate(sims, full, costs, rule.target_agreement, metric=rule.metric,
                                  metric_params=rule.metric_params)
    base_cost = cumulative[exit_policy.simulate(plain, sims, full)[0]].mean()
    best = 0.0
    for weight in (0.0, 1.0 / 16.0, 1.0 / 8.0, 1.0 / 4.0):
        tops = exit_policy.stage_scores(rule.metric, [x + weight * evidence for x in sims],
                                        rule.metric_params)
        favoured = [hot[np.arange(n), top1] for top1, _ in tops]
        fitted = exit_policy.calibrate_scores(tops, full, costs, rule.target_agreement,
                                              hot=favoured, metric=rule.metric,
                                              metric_params=rule.metric_params)
        stage, _ = exit_policy.simulate_scores(fitted, tops, full, favoured)
        best = max(best, base_cost / cumulative[stage].mean())
    return best, base_cost


def main(argv):
    del argv

    model = kerascompat.load_model(_MODEL.value)
    memory = memory_lib.SemanticMemory.load(
        _MEMORY.value or smtm_converter.memory_path_for(_MODEL.value))
    data = data_lib.load_fashion_mnist()
    _, (x_calib, _) = data.holdout(0.1)
    stage_models, head = stages_lib.split_model(model, memory.plan)

    def features(images):
        f = enc.extract_features(stage_models, head, images, memory.pooling)
        return memory.semantics(f), f.predictions, f.probabilities.max(axis=1)

    calib_sem, calib_full, calib_conf = features(x_calib)
    held = [streams.held_object(calib_full, 3000, seed=100 + k) for k in range(2)]
    held_sem, held_full, held_conf = features(
        np.concatenate([h.render(x_calib) for h in held]))
    rule = memory.exit_rule
    costs = memory.plan.stage_costs

    def calibrated(policy):
        """The memory's metric calibrated anew with `policy` (as `memory.recalibrate`)."""
        if policy is None:
            sims = [calib_sem[s] @ c.T for s, c in enumerate(memory.centres)]
            return exit_policy.calibrate(sims, calib_full, costs, rule.target_agreement,
                                         metric=rule.metric,
                                         metric_params=rule.metric_params), None
        return memory_lib.calibrate_memory(
            calib_sem, memory.centres, calib_full, costs, rule.target_agreement, rule.metric,
            rule.metric_params, policy, held_sem, held_full, 0, calib_conf, held_conf)

    base = cache.CachePolicy()
    variants = {
        "no hot set": calibrated(None),
        "cache, no prior": calibrated(dataclasses.replace(base, prior_weight=0.0,
                                                          instance_slots=0)),
        # The other prior: log-odds against the uncached classes, weight 1/16.
        "cache + contrast prior": calibrated(dataclasses.replace(
            base, prior=cache.Prior.CONTRAST, prior_weight=1.0 / 16.0, instance_slots=0)),
        # Before the admission gate: every full-model answer adds to its class.
        "cache + prior, no admission gate": calibrated(dataclasses.replace(
            base, admit_min_confidence=0.0, instance_slots=0)),
        # Before exit runs were checked.
        "cache + prior, no run checks": calibrated(dataclasses.replace(
            base, verify_after=0, instance_slots=0)),
        "cache + prior": calibrated(dataclasses.replace(base, instance_slots=0)),
        "cache + prior + short-term tier": calibrated(
            dataclasses.replace(base, instance_slots=4)),
    }
    tier_policy = variants["cache + prior + short-term tier"][1]
    print(f"short-term tier kept by calibration: {tier_policy.instance_slots > 0}")
    # Adaptation on the default rule (cache + prior), as is.
    default_rule, default_policy = variants["cache + prior"]
    variants["cache + prior + centre adaptation 0.1, verify 2%"] = (
        default_rule, dataclasses.replace(default_policy, adapt_rate=0.1, verify_rate=0.02))
    cumulative = exit_policy.exit_costs(memory.plan.stage_costs)

    def compute_share(out):
        """Mean share of full's compute per frame; a checked exit ran full too."""
        return cumulative[out.exit_stage].mean() + out.verified.mean()

    columns = list(variants)
    if _CEILING.value:
        columns += ["ceiling: memory fitted to the stream", "ceiling: scene oracle"]
    print("| stream | seed | " + " | ".join(columns) + " |")
    print("|---|---|" + "---|" * len(columns))
    for kind in _STREAMS.value:
        for seed in _SEEDS.value:
            stream = streams.make_stream(kind, data.y_test, _FRAMES.value, seed=int(seed))
            sem, full, confidence = features(stream.render(data.x_test))
            cells = []
            for r, p in variants.values():
                out = calibration.replay(r, p, sem, memory.centres, full,
                                   full_confidence=confidence)
                cost = compute_share(out)
                drop = 100 * ((full == stream.labels).mean()
                              - (out.prediction == stream.labels).mean())
                cells.append(f"{1 / cost:.2f}x, {100 * (out.prediction == full).mean():.2f}%, "
                             f"{drop:+.2f}")
            if _CEILING.value:
                oracle, base_cost = scene_oracle(memory, sem, full, stream.labels,
                                                 stream.scene_starts, costs)
                fitted, fitted_policy = calibration.calibrate_with_cache(
                    sem, memory.centres, full, costs, [np.arange(len(full))],
                    variants["cache + prior"][1], rule.target_agreement, rule.metric,
                    rule.metric_params, full_confidence=confidence)
                out = calibration.replay(fitted, fitted_policy, sem, memory.centres, full,
                                   full_confidence=confidence)
                cells.append(f"{base_cost / compute_share(out):.2f}x over "
                             f"{1 / base_cost:.2f}x")
                cells.append(f"{oracle:.2f}x")
            print(f"| {kind} | {seed} | " + " | ".join(cells) + " |", flush=True)


def run():
    command_line.run(main)


if __name__ == "__main__":
    run()
