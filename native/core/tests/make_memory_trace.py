"""Writes the memory-trace fixtures the native core replays (memory_replay_test.cc).

Each trace drives smtm_tf.runtime.cache.MemoryState, built from a descriptor
exactly as SmtmRuntime.set_exit_rule builds it, through a synthetic camera
stream (objects held in view for runs of frames, noisy semantic vectors,
occasional wrong head answers and full-model disagreements), calling it as
SmtmRuntime.classify_fast does. It records the inputs and, after every frame,
every decision and the memory's state, so the native Memory must make
identical decisions on identical inputs.

It also writes mutations of each descriptor with Python's verdict
(memory_trace_*_cases.json) and a small model with the integrity record this
smtm_tf writes (model_with_buffers_digest or model_with_file_digest).

Usage (from the repository root):
  PYTHONPATH=. python3 native/core/tests/make_memory_trace.py [--out native/core/tests/data]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os

import numpy as np

from smtm_tf.runtime import cache as cache_lib
from smtm_tf.runtime import descriptor as desc
from smtm_tf.runtime import io_utils

NUM_CLASSES, NUM_STAGES, DIM = 10, 3, 16
FINGERPRINT = "replay-fixture"


def _unit(rng, shape):
    v = rng.standard_normal(shape)
    return (v / np.linalg.norm(v, axis=-1, keepdims=True)).astype(np.float32)


def _signature(key, inputs, outputs):
    return {"key": key, "inputs": [{"name": n, "shape": s, "dtype": "float32"} for n, s in inputs],
            "outputs": [{"name": n, "shape": s, "dtype": "float32"} for n, s in outputs]}


def descriptor_json(centres, rule: dict, cache: dict | None) -> str:
    """A descriptor for NUM_STAGES stages with these centres, rule and policy."""
    k, d = NUM_CLASSES, DIM
    acts = [[1, 8, 8, 1], [1, 8, 8, 4], [1, 4, 4, 8], [1, 2, 2, 8]]
    stages = [{
        "signature": _signature(f"stage_{s}", [("activation", acts[s]), ("centres", [k, d])],
                                [("next_activation", acts[s + 1]), ("semantic", [d]),
                                 ("similarities", [k])]),
        "cut_layer": f"block{s}", "cost": 0.25,
        "centres": [[float(str(v)) for v in row] for row in centres[s]]}
        for s in range(NUM_STAGES)]
    lookup = desc.LookupOpSpec().to_dict()
    d = {"schema_version": 2, "model_name": "replay", "pooling": "gap",
         "class_names": [f"c{i}" for i in range(k)], "stages": stages,
         "head": _signature("head", [("activation", acts[-1])], [("probabilities", [k])]),
         "full": _signature("full", [("image", acts[0])], [("probabilities", [k])]),
         "exit_rule": rule, "lookup_op": lookup, "quantization": "float32", "cache": cache,
         "preprocessing": {"scale": [1.0 / 255], "offset": [0.0], "source": "unit"}}
    return json.dumps(d)


def stream(rng, centres, frames: int):
    """Per frame: similarities [S, K], semantics [S, D], head class, full class, confidence."""
    sims = np.zeros((frames, NUM_STAGES, NUM_CLASSES), np.float32)
    sems = np.zeros((frames, NUM_STAGES, DIM), np.float32)
    head = np.zeros(frames, np.int64)
    full = np.zeros(frames, np.int64)
    conf = np.zeros(frames, np.float64)
    noise = np.array([0.9, 0.6, 0.35])
    f = 0
    while f < frames:
        c = int(rng.integers(NUM_CLASSES)) if rng.random() < 0.7 else int(rng.integers(3))
        run = int(rng.integers(1, 30))
        held = _unit(rng, (NUM_STAGES, DIM)) * noise[:, None]
        for _ in range(run):
            if f == frames:
                break
            jitter = 0.02 if rng.random() < 0.6 else 0.3  # Mostly a held camera.
            v = centres[:, c] + held + jitter * _unit(rng, (NUM_STAGES, DIM))
            if rng.random() < 0.2:  # An ambiguous view: half another class.
                v = v + centres[:, (c + 3) % NUM_CLASSES]
            sems[f] = v / np.linalg.norm(v, axis=-1, keepdims=True)
            sims[f] = np.einsum("skd,sd->sk", centres, sems[f]).astype(np.float32)
            wrong = rng.random() < 0.08
            head[f] = (c + 1 + int(rng.integers(NUM_CLASSES - 1))) % NUM_CLASSES if wrong else c
            full[f] = head[f] if rng.random() < 0.9 else (head[f] + 1) % NUM_CLASSES
            conf[f] = float(np.float32(rng.uniform(0.5, 1.0)))
            f += 1
    return sims, sems, head, full, conf


def run_trace(memory: cache_lib.MemoryState, sims, sems, head, full, conf):
    """Drives the memory as SmtmRuntime.classify_fast does; returns the record."""
    frames, s_count, k = sims.shape
    rec = {
        "exit_stage": np.zeros(frames, np.int64), "answer": np.zeros(frames, np.int64),
        "top1": np.full((frames, s_count), -1, np.int64),
        "value": np.full((frames, s_count), np.nan, np.float64),
        "favoured": np.zeros((frames, s_count), bool),
        "hot": np.zeros((frames, k), bool), "scores": np.zeros((frames, k), np.float64),
        "shift": np.zeros((frames, k), np.float32), "capacity": np.zeros(frames, np.int64),
        "counters": np.zeros((frames, 6), np.int64),
        "centres_sha": np.zeros((frames, 32), np.uint8),
    }
    for f in range(frames):
        semantics = [sems[f, s] for s in range(s_count)]
        answer, stage = None, s_count
        for s in range(s_count):
            if memory.never[s]:
                continue
            top1, value, favoured = memory.lookup(s, sims[f, s], sems[f, s])
            rec["top1"][f, s], rec["value"][f, s], rec["favoured"][f, s] = top1, value, favoured
            ans = memory.decide(s, sims[f, s], sems[f, s])
            if ans >= 0:
                confirmed = False
                if memory.verify_due():
                    memory.verified(ans, int(full[f]))
                    if int(full[f]) != ans:
                        ans, confirmed = int(full[f]), True
                memory.record(ans, confirmed, semantics, s + 1, conf[f] if confirmed else 1.0)
                answer, stage = ans, s
                break
        if answer is None:
            answer = int(head[f])
            memory.record(answer, True, semantics, s_count, conf[f])
        rec["exit_stage"][f], rec["answer"][f] = stage, answer
        rec["hot"][f] = memory.hot
        rec["scores"][f] = memory.scores
        rec["shift"][f] = memory.shift
        rec["capacity"][f] = memory.capacity
        rec["counters"][f] = (memory.exits, memory.checks, memory.disagreements, memory.reverts,
                              memory.exit_run, memory.last_hit)
        rec["centres_sha"][f] = np.frombuffer(
            hashlib.sha256(np.ascontiguousarray(memory.centres, np.float32).tobytes()).digest(),
            np.uint8)
    return rec


CASES = {
    # Margin, share prior, short-term tier, adaptation, sampled and run verification.
    "margin_share": dict(
        rule={"metric": "margin", "thresholds": [0.5, 0.4, 0.3],
              "cold_thresholds": [0.8, 0.6, 0.5], "instance_thresholds": [0.97, 0.97, None],
              "target_agreement": 0.99},
        cache={"decay": 0.9, "exit_weight": 0.25, "admit_min_confidence": 0.7, "hot_min": 0.3,
               "min_hot": 1, "max_hot": 4, "window": 10, "grow_after": 2,
               "prior_weight": 0.125, "prior": "share", "instance_slots": 3,
               "instance_match": 0.95, "instance_shift": 0.1, "instance_min_confidence": 0.6,
               "adapt_rate": 0.2, "max_drift": 0.3, "verify_rate": 0.1, "verify_after": 6}),
    # Layer-aware metric, contrast prior, a stage that never exits.
    "layer_aware_contrast": dict(
        rule={"metric": "layer_aware", "thresholds": [None, 3.0, 2.0],
              "cold_thresholds": [None, 4.0, 3.0], "target_agreement": 0.95,
              "instance_thresholds": [None, 0.96, 0.96],
              "metric_params": "random"},
        cache={"decay": 0.8, "exit_weight": 0.5, "admit_min_confidence": 0.0, "hot_min": 0.5,
               "min_hot": 0, "max_hot": 3, "window": 7, "grow_after": 1,
               "prior_weight": 0.3, "prior": "contrast", "instance_slots": 2,
               "instance_match": 0.95, "instance_shift": 0.2, "instance_min_confidence": 0.0,
               "adapt_rate": 0.5, "max_drift": 0.05, "verify_rate": 0.33, "verify_after": 0}),
    # Top-1 similarity, no cache (the rule has no cold thresholds).
    "top1_nocache": dict(
        rule={"metric": "top1", "thresholds": [0.9, 0.85, 0.8], "target_agreement": 0.9},
        cache=None),
}


def write_model_fixture(out: str, descriptor_text: str) -> None:
    """A small .tflite flatbuffer with a descriptor and an integrity record.

    It carries no graph: the core reads only Model.buffers and Model.metadata.
    Written as model_with_<kind>_digest.bin, <kind> the record this smtm_tf
    writes ("buffers": content_digest; "file": the whole-file record), with
    the expected digests beside it (.json).
    """
    from ai_edge_litert import schema_py_generated as schema
    from ai_edge_litert.tools import flatbuffer_utils

    from smtm_tf.runtime import metadata

    model = schema.ModelT()
    model.version = 3
    model.subgraphs = []
    model.buffers = []
    for content in (b"", bytes(range(256)) * 3, b"weights"):
        buffer = schema.BufferT()
        buffer.data = bytearray(content)
        model.buffers.append(buffer)
    content = bytes(flatbuffer_utils.convert_object_to_bytearray(model))
    content = metadata.add_metadata(content, "other_entry", b"not the descriptor")
    content = metadata.add_metadata(content, desc.METADATA_NAME, descriptor_text.encode())
    content = metadata.add_digest(content)
    record = metadata.read_metadata(content, metadata.DIGEST_NAME)
    kind = "file" if record.startswith(b"sha256-file:") else "buffers"
    base = os.path.join(out, f"model_with_{kind}_digest")
    io_utils.write_bytes_atomic(base + ".bin", content)
    expected = {"content_digest": metadata.content_digest(content),
                "stored_digest": record.decode(),
                "descriptor_sha256": hashlib.sha256(descriptor_text.encode()).hexdigest()}
    io_utils.write_bytes_atomic(base + ".json", json.dumps(expected, indent=1).encode())


_ODD_VALUES = (None, True, False, "x", "", 0, -1, 1.5, 1e30, -1e30, 2**40 + 1, 3.0, [], {},
               [1], [[1.0, 0.0]], "top1", "share", 0.5, 2, 17, -0.5)


def _paths(value, path=""):
    yield path, value
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _paths(v, f"{path}/{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value[:3]):  # The first rows of long lists suffice.
            yield from _paths(v, f"{path}/{i}")


def apply_patch(doc, patch):
    """RFC 6902 add / remove / replace on parsed JSON (what nlohmann's patch does)."""
    doc = json.loads(json.dumps(doc))
    for op in patch:
        *parents, last = op["path"].split("/")[1:]
        target = doc
        for p in parents:
            target = target[int(p)] if isinstance(target, list) else target[p]
        key = int(last) if isinstance(target, list) else last
        if op["op"] == "remove":
            del target[key]
        elif op["op"] == "add" and isinstance(target, list):
            target.insert(key, op["value"])
        else:
            target[key] = op["value"]
    return doc


def descriptor_cases(rng, text: str, count: int) -> list:
    """Mutations of a descriptor and what Python's parser says of each."""
    base = json.loads(text)
    paths = [p for p, _ in _paths(base) if p]
    cases = []
    for _ in range(count):
        path = paths[int(rng.integers(len(paths)))]
        value = apply_patch(base, [])
        for part in path.split("/")[1:]:
            value = value[int(part)] if isinstance(value, list) else value[part]
        kind = rng.random()
        if kind < 0.15:
            patch = [{"op": "remove", "path": path}]
        elif kind < 0.25 and isinstance(value, dict):
            patch = [{"op": "add", "path": f"{path}/bogus", "value": 1}]
        elif kind < 0.45 and isinstance(value, (int, float)) and not isinstance(value, bool):
            factor = float(rng.choice([2.0, -1.0, 1.0005, 0.5, 1e6]))
            patch = [{"op": "replace", "path": path, "value": value * factor}]
        else:
            odd = _ODD_VALUES[int(rng.integers(len(_ODD_VALUES)))]
            patch = [{"op": "replace", "path": path, "value": odd}]
        try:
            desc.Descriptor.from_json(json.dumps(apply_patch(base, patch)))
            verdict = "ok"
        except desc.DescriptorError as e:
            verdict = str(e)
        except Exception as e:  # pylint: disable=broad-except
            verdict = f"unexpected {type(e).__name__}: {e}"
        cases.append({"patch": patch, "python": verdict})
    return cases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "data"))
    parser.add_argument("--frames", type=int, default=400)
    args = parser.parse_args()
    for i, (name, case) in enumerate(CASES.items()):
        rng = np.random.default_rng(1000 + i)
        centres = _unit(rng, (NUM_STAGES, NUM_CLASSES, DIM))
        centres[0, 7] = 0.0  # A class with no frame at stage 0 (a zero row).
        rule = dict(case["rule"])
        if rule.get("metric_params") == "random":
            rule["metric_params"] = [
                [[float(str(np.float32(v))) for v in (rng.uniform(-2, 0), rng.uniform(5, 20))]
                 for _ in range(NUM_CLASSES)] for _ in range(NUM_STAGES)]
        text = descriptor_json(centres, rule, case["cache"])
        d = desc.Descriptor.from_json(text)
        policy = d.cache if d.exit_rule.uses_cache else None  # As set_exit_rule.
        memory = cache_lib.MemoryState(policy, d.exit_rule, [st.centres for st in d.stages])
        inputs = stream(rng, np.stack([st.centres for st in d.stages]), args.frames)
        rec = run_trace(memory, *inputs)
        sims, sems, head, full, conf = inputs
        base = os.path.join(args.out, f"memory_trace_{name}")
        io_utils.write_bytes_atomic(base + ".json", text.encode())
        buf = io.BytesIO()
        np.savez(buf, sims=sims, sems=sems, head=head, full=full, conf=conf, **rec)
        io_utils.write_bytes_atomic(base + ".npz", buf.getvalue())
        # The final state as host.py save_state writes it (format 3).
        arrays = {f"state_{k}": v for k, v in memory.to_arrays().items()}
        arrays["meta"] = np.array(json.dumps({"format_version": 3, "model": FINGERPRINT}))
        io_utils.write_npz_atomic(base + "_state.npz", arrays)
        if i == 0:
            write_model_fixture(args.out, text)
        cases = descriptor_cases(rng, text, 300)
        io_utils.write_bytes_atomic(f"{base}_cases.json", json.dumps(cases, indent=0).encode())
        exits = np.bincount(rec["exit_stage"], minlength=NUM_STAGES + 1)
        print(f"{name}: {args.frames} frames, exits per stage {exits.tolist()}, checks "
              f"{memory.checks}, disagreements {memory.disagreements}, reverts {memory.reverts}, "
              f"adapted {int(memory.adapted.sum())}, instance matches "
              f"{int((rec['favoured'] & ~np.take_along_axis(rec['hot'][:, None, :].repeat(NUM_STAGES, 1), np.maximum(rec['top1'], 0)[:, :, None], 2)[:, :, 0]).sum())}")


if __name__ == "__main__":
    main()
