"""Another exit rule decides the same in the native runtime as in Python.

Python's `SmtmRuntime.set_exit_rule` and the native `--exit_rule` (C
`smtm_set_exit_rule`) take the same rule and cache policy, written by
`descriptor.rule_choice_json`: thresholds 1.5x higher without a cache, and
the descriptor's rule with cache scores that decay faster. Each must decide
otherwise than the descriptor's rule, give the same class and exit stage in
both runtimes on every frame of a golden stream, and exit early on some. A
rule for another number of stages must be refused. A state saved under a
rule restores in the other runtime under the same rule (the fingerprint
covers the rule, as host.py's does).

  python3 native/tests/exit_rule_switch.py --cli=native/build/smtm_cli
Needs SMTM_GOLDEN_DIR (scripts/golden_traces.py --export_dir); exits 77
(skipped) without it.
"""

import dataclasses
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

import golden_args  # native/tests/, beside this script.

sys.path.insert(0, os.getcwd())
from smtm_tf.runtime import SmtmRuntime  # noqa: E402  pylint: disable=wrong-import-position
from smtm_tf.runtime import descriptor as desc_lib  # noqa: E402  pylint: disable=wrong-import-position


def _native(cli, model, frames_path, rule_path, state=None):
    command = [cli, "classify", f"--model={model}", f"--frames={frames_path}",
               f"--exit_rule={rule_path}"]
    if state:
        command.append(f"--state={state}")
    run = subprocess.run(command, capture_output=True, text=True, check=False)
    return run.returncode, run.stdout, run.stderr


def main() -> int:
    args, golden = golden_args.parse(default_kind="scene_change")
    model = os.path.join(golden, args.model + ".tflite")
    frames_path = os.path.join(golden, args.model, args.kind + ".frames.npy")
    frames = np.load(frames_path)
    with open(model, "rb") as f:
        content = f.read()
    own = SmtmRuntime(content)
    own_decisions = np.load(os.path.join(golden, args.model, args.kind + ".decisions.npy"))
    rule, policy = own.descriptor.exit_rule, own.descriptor.cache
    stricter = dataclasses.replace(
        rule, thresholds=tuple(None if t is None else 1.5 * t for t in rule.thresholds),
        cold_thresholds=None, instance_thresholds=None)
    choices = {"stricter, no cache": (stricter, None),
               "own rule, faster decay": (rule, dataclasses.replace(policy, decay=0.7))}
    with tempfile.TemporaryDirectory() as tmp:
        rule_path = os.path.join(tmp, "rule.json")
        for name, (r, p) in choices.items():
            py = SmtmRuntime(content)
            py.set_exit_rule(r, p)
            want = [(d.class_id, d.exit_stage) for d in map(py.classify, frames)]
            with open(rule_path, "w") as f:
                f.write(desc_lib.rule_choice_json(r, p))
            rc, out, err = _native(args.cli, model, frames_path, rule_path)
            if rc != 0:
                print(f"{name}: smtm_cli failed (rc {rc}): {err}")
                return 1
            got = [tuple(int(v) for v in line.split()) for line in out.splitlines()]
            if got != want:
                bad = next(i for i, (g, w) in enumerate(zip(got, want)) if g != w)
                print(f"{name}: frame {bad} native {got[bad]} vs Python {want[bad]} "
                      f"({len(got)} vs {len(want)} frames)")
                return 1
            if want == [tuple(d) for d in own_decisions.tolist()]:
                print(f"{name}: decides as the descriptor's rule; the test would not see "
                      "a switch that did nothing")
                return 1
            early = sum(e < py.num_stages for _, e in want)
            print(f"{name}: {len(want)} frames decided identically, {early} early exits")
            if early == 0:
                print(f"{name}: no early exit, the comparison says little")
                return 1
            # State files under this rule cross both ways (same fingerprint).
            half = len(frames) // 2
            state = os.path.join(tmp, "state.npz")
            first = SmtmRuntime(content)
            first.set_exit_rule(r, p)
            for frame in frames[:half]:
                first.classify(frame)
            first.save_state(state)
            rest = os.path.join(tmp, "rest.npy")
            np.save(rest, np.ascontiguousarray(frames[half:], np.float32))
            rc, out, err = _native(args.cli, model, rest, rule_path, state)
            got = [tuple(int(v) for v in line.split()) for line in out.splitlines()]
            if rc != 0 or "Ignoring" in err or got != want[half:]:
                print(f"{name}: native did not continue Python's state under this rule: "
                      f"rc {rc}, {err.strip()}, {sum(g != w for g, w in zip(got, want[half:]))} "
                      "frames differ")
                return 1
            back = SmtmRuntime(content)
            back.set_exit_rule(r, p)
            if not back.load_state(state):
                print(f"{name}: Python did not restore the native state saved under this rule")
                return 1
            print(f"{name}: state files cross both ways under this rule")
            # A state of the descriptor's own rule is not this rule's.
            plain = SmtmRuntime(content)
            plain.classify(frames[0])
            plain.save_state(state)
            rc, _, err = _native(args.cli, model, rest, rule_path, state)
            if rc != 0 or "Ignoring" not in err:
                print(f"{name}: native restored a state saved under another rule: {err}")
                return 1
        # Python refuses to build such a rule; the native runtime reads JSON.
        wrong = json.loads(desc_lib.rule_choice_json(stricter, None))
        for field in ("thresholds", "metric_params"):
            wrong["exit_rule"][field] = wrong["exit_rule"][field][:-1]
        with open(rule_path, "w") as f:
            json.dump(wrong, f)
        rc, _, err = _native(args.cli, model, frames_path, rule_path)
        if rc != 1 or "stages" not in err:
            print(f"a rule for one stage less was not refused: rc {rc}, {err}")
            return 1
        print(f"a rule for one stage less is refused: {err.strip()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
