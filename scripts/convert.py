"""Converts a trained Keras classifier into an SMTM .tflite.

Example:
  python scripts/convert.py --model=model.keras --data=fashion_mnist \
      --output=model.smtm.tflite

Models that expect preprocessed input (x / 255, [-1, 1], ImageNet mean/std)
and do not do it in their first layer need `--preprocessing` or
`--input_scale`/`--input_offset`; the .tflite records it and runtimes apply
it to camera pixels.

A semantic memory file (`--memory`; by default `<output>.smtm.npz`, or
`<model>.smtm.npz` from `SemanticMemoryCallback`) is used only when its key
matches this model, preprocessing, data and choices; otherwise the encoders
are trained and the exits calibrated from `--data`, and the memory is saved to
`--memory` or beside the output, once every check has passed.
"""

from scripts import command_line  # First: quiets native logs before TensorFlow loads.


from absl import app
from absl import flags

from converters import quantization as quant
from converters import smtm_converter
from smtm_tf.runtime import cache as cache_lib
from smtm_tf.fitting import calibration
from smtm_tf.fitting import data as data_lib
from smtm_tf.runtime import exit_policy
from smtm_tf.fitting import kerascompat
from smtm_tf.fitting import stages as stages_lib
from scripts import model_flags

_MODEL = flags.DEFINE_string("model", None, "Trained Keras model (.keras or .h5).",
                             required=True)
_DATA = flags.DEFINE_string(
    "data", None, "'fashion_mnist', a .npz with x_train/y_train/x_test/y_test, or a "
    "folder with one sub-folder of images per class.", required=True)
_OUTPUT = flags.DEFINE_string("output", None, "Where to write the .tflite.", required=True)
_MEMORY = flags.DEFINE_string(
    "memory", None, "Semantic memory file to reuse (when its key matches) and to write a "
    "newly fitted memory to; default <output>.smtm.npz (reading <model>.smtm.npz too).")
_RETRAIN = flags.DEFINE_bool("retrain", False,
                             "Fit a new memory even if a matching memory file exists.")
_CHECK_ACCURACY = flags.DEFINE_bool(
    "check_accuracy", True, "Score the Keras model on the labelled data first and stop when "
    "it looks like other data or other preprocessing; --nocheck_accuracy for structural "
    "conversions of untrained models.")
_BUDGET = flags.DEFINE_float(
    "max_accuracy_drop", 1.0, "Budget: points of top-1 agreement with the full model the "
    "early exits may lose (calibrated with a 95% lower confidence bound).")
_TARGET = flags.DEFINE_float("target_agreement", None,
                             "Share of all frames whose answer must agree with the full "
                             "model; overrides --max_accuracy_drop.")
_METRIC = flags.DEFINE_enum("metric", "layer_aware", ["top1", "margin", "layer_aware"],
                            "Exit metric.")
_CACHE = flags.DEFINE_bool(
    "cache", True, "Calibrate with a cache of hot classes in the loop (relaxed threshold "
    "for hot classes, stricter for others); --nocache for one threshold per stage.")
_HOLDOUT = flags.DEFINE_float("holdout", 0.1,
                              "Tail share of the train split used for calibration.")
_QUANTIZE = flags.DEFINE_enum(
    "quantize", "float32", ["float32", "float16", "dynamic", "int8", "qat", "int16x8"],
    "float32; float16 weights; dynamic-range int8; full int8 (representative data from "
    "--data's train split); qat (quantization-aware fine-tuning, tf_keras models, needs "
    "tensorflow-model-optimization). int16x8 is refused (older runtimes cannot load it).")
_QAT_EPOCHS = flags.DEFINE_integer("qat_epochs", 1, "QAT fine-tuning epochs.")
_QAT_IMAGES = flags.DEFINE_integer("qat_images", 6000, "Training images QAT fine-tunes on.")
_GPU_GATE = flags.DEFINE_bool(
    "gpu_gate", True, "Compile every signature strictly on the GPU (software Vulkan "
    "without a GPU), report ops that fall back, and compare GPU with CPU outputs.")
_REQUIRE_GPU = flags.DEFINE_bool(
    "require_gpu", False, "Make a failed GPU gate (or no GPU) an error; nothing is written.")
_GPU_PRECISION = flags.DEFINE_enum("gpu_precision", "fp32", ["fp32", "fp16"],
                                   "GPU kernel precision for the gate.")
_REQUIRE_OLD_RUNTIME = flags.DEFINE_bool(
    "require_old_runtime", False, "Fail unless tflite-runtime 2.14 (its virtualenv: "
    "--old_runtime_python, see README.md) loads and runs every signature; without the flag the check runs when that "
    "environment exists and a failure is flagged.")


def main(argv):
    del argv
    try:
        quantization = quant.parse(_QUANTIZE.value)
    except quant.QuantizationError as e:
        raise app.UsageError(str(e)) from e
    _convert(quantization)  # An error prints as one line (scripts/command_line.py).


def _convert(quantization):
    if model_flags.CAMERA_CALIBRATION.value and not _CACHE.value:
        raise app.UsageError("--camera_calibration calibrates the hot-class cache's exits: "
                             "drop --nocache, or drop --camera_calibration.")
    print(f"loading {_MODEL.value}", flush=True)
    model = kerascompat.load_model(_MODEL.value)
    shape = tuple(int(d) for d in model.inputs[0].shape[1:])
    preprocessing = model_flags.resolve(model)
    data = data_lib.load_data(_DATA.value, image_size=shape[:2], channels=shape[2])
    print(f"data {_DATA.value}: {len(data.x_train)} train, {len(data.x_test)} test images "
          f"of {data.num_classes} classes, brought to the model's input {shape} "
          "(smtm_tf.fitting.data.adapt_images)", flush=True)
    target = (_TARGET.value if _TARGET.value is not None
              else exit_policy.budget_to_target(_BUDGET.value))
    memory_file = _MEMORY.value or smtm_converter.memory_path_for(_OUTPUT.value)
    candidates = [] if _RETRAIN.value else (
        [_MEMORY.value] if _MEMORY.value else
        [memory_file, smtm_converter.memory_path_for(_MODEL.value)])
    memory, report = smtm_converter.convert_model(
        model, data, _OUTPUT.value, holdout=_HOLDOUT.value,
        **model_flags.memory_choices(), target_agreement=target, metric=_METRIC.value,
        cache_policy=cache_lib.CachePolicy() if _CACHE.value else None,
        memory_output=memory_file, memory_candidates=candidates, quantization=quantization,
        qat_epochs=_QAT_EPOCHS.value, qat_images=_QAT_IMAGES.value,
        gpu_check=_GPU_GATE.value, require_gpu=_REQUIRE_GPU.value,
        gpu_precision=_GPU_PRECISION.value, require_old_runtime=_REQUIRE_OLD_RUNTIME.value,
        old_runtime_python=command_line.OLD_RUNTIME_PYTHON.value,
        preprocessing=preprocessing, accuracy_check=_CHECK_ACCURACY.value,
        progress=lambda line: print(line, flush=True))
    plain = len(smtm_converter.convert_keras(model))
    print(f"stages end at: {', '.join(memory.plan.cut_layers)}")
    print("compute share per stage: "
          + ", ".join(f"{100 * c:.1f}%" for c in memory.plan.stage_costs))
    for line in stages_lib.explain_plan(model, memory.plan):
        print("  " + line)
    print("nearest-centre agreement with full per stage (calibration set): "
          + ", ".join(f"{100 * a:.1f}%" for a in memory.stage_accuracy))
    if memory.missing_classes:
        names = [memory.class_names[c] for c in memory.missing_classes]
        print(f"{len(names)} classes got no fitting frame and cannot exit: "
              + ", ".join(names[:20]) + (" ..." if len(names) > 20 else ""))
    rule = memory.exit_rule
    print(f"exit thresholds ({rule.metric.value}"
          + (", hot top-1 class" if rule.uses_cache else "") + "): "
          + ", ".join("never" if t is None else f"{t:.4f}" for t in rule.thresholds))
    if rule.uses_cache:
        print("exit thresholds (cold top-1 class): "
              + ", ".join("never" if t is None else f"{t:.4f}" for t in rule.cold_thresholds))
    if model_flags.CAMERA_CALIBRATION.value:
        print("calibrated on camera and camera_pan streams too; each calibration stream's "
              f"agreement bound: {calibration.RUN_BOUND}")
    print("which classes can exit where (hot top-1 class):")
    for line in exit_policy.format_exit_report(
            exit_policy.exit_report(rule, len(memory.class_names)), memory.class_names):
        print("  " + line)
    if report.quantization == "float32":
        print(f"checks on {report.num_check_images} images: full vs Keras "
              f"{report.full_max_abs_diff:.2e}, stage chain vs Keras "
              f"{report.chain_max_abs_diff:.2e}, similarities "
              f"{report.similarity_max_abs_diff:.2e}, CompiledModel vs Interpreter "
              f"{report.compiled_max_abs_diff:.2e} (Keras against itself, one image "
              f"against a batch: {report.keras_batch_spread:.2e})")
    else:
        print(f"{report.quantization} checks on {report.num_check_images} images: top-1 "
              f"agreement with Keras: full {100 * report.full_top1_agreement:.1f}%, stage "
              f"chain {100 * report.chain_top1_agreement:.1f}%; probabilities max diff "
              f"{max(report.full_max_abs_diff, report.chain_max_abs_diff):.2e}")
    if report.exit_rule is not None:
        print(report.exit_rule.format())
    if report.stage_times is not None:
        print(report.stage_times.format(memory.plan))
    if report.gpu_gate is not None:
        print(report.gpu_gate.format())
    if report.old_runtime is None:
        print("tflite-runtime 2.14 check: skipped (no old-runtime Python: pass "
              "--old_runtime_python; see README.md)")
    elif report.old_runtime.ok:
        print(report.old_runtime.format())
    else:
        print("WARNING: NOT LOADABLE ON OLDER APP RUNTIMES: " + report.old_runtime.format())
    print(f"wrote {_OUTPUT.value}: {report.size_bytes} bytes "
          f"({100 * (report.size_bytes / plain - 1):+.1f}% vs a plain conversion, "
          f"{plain} bytes)")


def run():
    command_line.run(main)


if __name__ == "__main__":
    run()
