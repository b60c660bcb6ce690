"""Measures converted variants of one model: accuracy, speed-up, GPU and old-runtime checks.

Example:
  for q in float32 float16 dynamic int8 qat; do
    python scripts/convert.py --model=models/demo_resnet.keras --data=fashion_mnist \
        --quantize=$q --output=out/demo_$q.tflite
  done
  python scripts/check_variants.py --reference=out/demo_float32.tflite \
      --variants=out/demo_float16.tflite,out/demo_dynamic.tflite,out/demo_int8.tflite,out/demo_qat.tflite

For each model (the float32 reference first) it prints: top-1 accuracy of
`full` on the whole test split and its drop vs the reference; the early-exit
speed-up and accuracy on a stream (`validation.compare`, interleaved, CPU);
the exit rule replayed on calibration streams; per-signature strict GPU
compilation and GPU-vs-CPU agreement (fp32 and fp16 kernels); exit decisions
GPU (fp32) vs CPU on a stream; and whether tflite-runtime 2.14 loads and runs
every signature.
"""

from scripts import command_line  # First: quiets native logs before TensorFlow loads.

import json

from absl import flags
import numpy as np

from converters import gpu_gate
from converters import smtm_converter
from converters import agreement
from delegates import cpu
from delegates import gpu
from converters import old_runtime
from smtm_tf.fitting import data as data_lib
from smtm_tf.runtime import io_utils
from smtm_tf.fitting import memory as memory_lib
from smtm_tf.fitting import streams
from smtm_tf.evaluation import validation
from smtm_tf.runtime import SmtmRuntime

_REFERENCE = flags.DEFINE_string("reference", None, "The float32 .tflite.", required=True)
_VARIANTS = flags.DEFINE_list("variants", [], "Quantized .tflite files to compare with it.")
_DATA = flags.DEFINE_string("data", "fashion_mnist", "Data (its test split is used).")
_STREAM = flags.DEFINE_string("stream", "video", "Stream for the speed-up.")
_FRAMES = flags.DEFINE_integer("frames", 3000, "Frames of the speed-up stream.")
_DECISION_FRAMES = flags.DEFINE_integer("decision_frames", 500,
                                        "Frames of the GPU-vs-CPU decision stream.")
_GPU_SAMPLES = flags.DEFINE_integer("gpu_samples", 32, "Images for GPU-vs-CPU agreement.")
_HOLDOUT = flags.DEFINE_float("holdout", 0.1, "Calibration share of the train split.")
_SEED = flags.DEFINE_integer("seed", 0, "Stream seed.")
_JSON = flags.DEFINE_string("json_output", None, "Also write the figures as JSON here.")


def _accuracy(flat: bytes, x: np.ndarray, y: np.ndarray) -> float:
    sig = cpu.CpuBackend().load(flat).signature("full")
    inp, out = sig.input_view("image"), sig.output_view("probabilities")
    hits = 0
    for image, label in zip(x.astype(np.float32), y):
        np.copyto(inp, image[None])
        sig.invoke()
        hits += int(out.argmax() == label)
    return hits / len(y)


def _measure(path: str, data, frames, labels, decision_frames, x_cal) -> dict:
    with open(path, "rb") as f:
        flat = f.read()
    rt = SmtmRuntime(flat)
    row = {"model": path, "quantization": rt.descriptor.quantization, "bytes": len(flat)}
    print(f"== {path} ({row['quantization']}, {len(flat)} bytes)", flush=True)
    row["full_top1"] = _accuracy(flat, data.x_test, data.y_test)
    c = validation.compare(rt, frames, labels)
    row.update(stream_speedup=c.speedup, stream_accuracy_drop=c.accuracy_drop,
               stream_full_top1=c.full.accuracy, stream_smtm_top1=c.smtm.accuracy)
    agree, _, _ = smtm_converter.replay_rule(  # pylint: disable=protected-access
        flat, x_cal, lambda full: memory_lib.calibration_streams(full, num_frames=3000,
                                                                 seed=_SEED.value))
    row["rule_replay_agreement"] = list(agree)
    print(f"   full top-1 {100 * row['full_top1']:.2f}%; {_STREAM.value}: speed-up "
          f"{c.speedup:.2f}x, SMTM top-1 {-c.accuracy_drop:+.2f} points vs full; rule replay "
          + ", ".join(f"{100 * a:.2f}%" for a in agree), flush=True)
    for precision in ("fp32", "fp16"):
        gate = gpu_gate.gpu_gate(flat, data.x_test[:_GPU_SAMPLES.value], precision=precision)
        print("   " + gate.format().replace("\n", "\n   "), flush=True)
        row[f"gpu_{precision}"] = {
            "available": gate.available,
            "fully_accelerated": {k: s.fully_accelerated for k, s in gate.signatures.items()},
            "fallback_ops": {k: list(s.fallback_ops) for k, s in gate.signatures.items()
                             if s.fallback_ops},
            "agreement_ok": None if gate.agreement is None else gate.agreement.ok,
            "max_diff": None if gate.agreement is None else {
                o: gate.agreement.max_diff(o) for o in
                ("similarities", "semantic", "probabilities", "next_activation")}}
        if precision == "fp32" and gate.fully_accelerated and gate.agreement.ok:
            d = agreement.compare_decisions(flat, gpu.GpuBackend(strict=True, precision="fp32"),
                                            decision_frames)
            row["gpu_fp32_decisions"] = {"frames": d.frames, "identical": d.identical}
            print(f"   exit decisions GPU (fp32) vs CPU: {d.identical}/{d.frames} identical",
                  flush=True)
    try:
        (old,) = old_runtime.check_models([path], data.x_test[:1],
                                         python=command_line.OLD_RUNTIME_PYTHON.value)
        row["tflite_runtime_2_14"] = {"ok": old.ok, "runtime": old.runtime,
                                      "max_diff": max((s.max_abs_diff for s in old.signatures),
                                                      default=None)}
        print("   " + old.format(), flush=True)
    except old_runtime.OldRuntimeUnavailable as e:
        row["tflite_runtime_2_14"] = {"ok": None, "skipped": str(e)}
        print(f"   tflite-runtime 2.14: skipped ({e})", flush=True)
    return row


def _interleaved_latency(paths, frames: np.ndarray) -> dict:
    """Mean us per frame of `full` and of SMTM for every model, measured side by
    side by the harness (`validation.run_interleaved`)."""
    contenders = []
    for p in paths:
        with open(p, "rb") as f:
            rt = SmtmRuntime(f.read())
        contenders += [((p, "full"), validation.FullOf(rt)), ((p, "smtm"), rt)]
    frames = np.ascontiguousarray(np.asarray(frames, np.float32)[:, None])
    out = validation.run_interleaved(contenders, frames)
    return {key: float(ns.mean()) / 1e3 for key, (_, _, ns) in out.items()}


def main(argv):
    del argv
    data = data_lib.load_data(_DATA.value)
    stream = streams.make_stream(_STREAM.value, data.y_test, _FRAMES.value, seed=_SEED.value)
    frames, labels = stream.render(data.x_test), stream.labels
    decision = streams.make_stream(_STREAM.value, data.y_test, _DECISION_FRAMES.value,
                                   seed=_SEED.value + 1).render(data.x_test)
    (_, _), (x_cal, _) = data.holdout(_HOLDOUT.value)
    paths = [_REFERENCE.value] + _VARIANTS.value
    rows = [_measure(p, data, frames, labels, decision, x_cal) for p in paths]
    latency = _interleaved_latency(paths, frames)
    for p, r in zip(paths, rows):
        r["full_us"], r["smtm_us"] = latency[(p, "full")], latency[(p, "smtm")]
    ref = rows[0]
    print()
    print(f"| variant | bytes | full top-1 | drop vs float32 | {_STREAM.value} speed-up | "
          "SMTM vs full | full us | SMTM us | SMTM vs float32 full | GPU strict (fp32) | "
          "GPU vs CPU (fp32) | tflite-runtime 2.14 |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        g = r["gpu_fp32"]
        strict = ("n/a" if not g["available"] else
                  f"{sum(g['fully_accelerated'].values())}/{len(g['fully_accelerated'])}")
        agrees = ("n/a" if g["agreement_ok"] is None else
                  f"{'ok' if g['agreement_ok'] else 'WRONG'} "
                  f"(sims {g['max_diff']['similarities']:.1e})")
        old = r["tflite_runtime_2_14"]["ok"]
        print(f"| {r['quantization']} | {r['bytes']} | {100 * r['full_top1']:.2f}% | "
              f"{100 * (ref['full_top1'] - r['full_top1']):+.2f} | "
              f"{r['stream_speedup']:.2f}x | {-r['stream_accuracy_drop']:+.2f} | "
              f"{r['full_us']:.0f} | {r['smtm_us']:.0f} | {ref['full_us'] / r['smtm_us']:.2f}x | "
              f"{strict} | "
              f"{agrees} | {'n/a' if old is None else 'runs' if old else 'FAILS'} |")
    if _JSON.value:
        io_utils.write_bytes_atomic(_JSON.value, json.dumps(rows, indent=2).encode())


def run():
    command_line.run(main)


if __name__ == "__main__":
    run()
