"""The zoo table: every zoo model through the converter and the runtime, as a user would.

Per model: the default conversion (float32, the model's own preprocessing
flag), `full` against Keras, the planned compute shares, speed-up and
agreement with `full` on `video`, `uniform` and `object` streams (both methods
interleaved in one process: `validation.compare`), the int8 and float16
conversions, the tflite-runtime 2.14 check and the strict GPU gate; given
smtm_cli, the native runtime on the same video frames (`native_bench`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
import traceback

import numpy as np

from converters import quantization as quant
from converters import smtm_converter
from delegates import cpu
from smtm_tf.fitting import data as data_lib
from smtm_tf.runtime import exit_policy
from smtm_tf.runtime import io_utils
from smtm_tf.fitting import kerascompat
from smtm_tf.runtime import preprocessing as prep
from smtm_tf.fitting import streams as streams_lib
from smtm_tf.evaluation import native_bench
from smtm_tf.evaluation import validation
from smtm_tf.runtime import SmtmRuntime

STREAMS = ("video", "uniform", "object")
VARIANTS = ("int8", "float16")


@dataclasses.dataclass
class StreamFigures:
    speedup: float
    agreement: float  # Share of frames answered as `full` answers them.
    accuracy_drop: float  # Top-1 points lost against `full` (labels).
    # The same exits in multiply-adds (exit_policy.compute_speedup): what the
    # speed-up would be if host work and per-signature calls cost nothing.
    compute_speedup: float | None = None
    # validation.steady_share of `full`'s answers (how often it keeps its
    # answer within a scene; on `object` a held image).
    full_steady: float | None = None
    # Where SMTM and `full` differ, by who was right (validation.Disagreements).
    disagreements: validation.Disagreements | None = None


@dataclasses.dataclass
class ZooRow:
    """One zoo model's figures (None where a step failed or did not run)."""

    name: str
    preprocessing: str  # The flag the conversion used ("" when none was needed).
    keras_accuracy: float | None = None
    convert_seconds: float | None = None
    stage_shares: tuple[float, ...] = ()
    # The stages' and the head's shares of a full chain's time, measured at
    # conversion (`converters.stage_times`); () when not measured.
    time_shares: tuple[float, ...] = ()
    full_vs_keras: float | None = None
    streams: dict = dataclasses.field(default_factory=dict)  # kind -> StreamFigures
    # On the video stream: `full` per frame, and the runtime's host work per
    # frame (validation.host_work_us), in microseconds.
    full_us: float | None = None
    host_us: float | None = None
    # `smtm_cli bench` on the same video frames (None when not asked for or
    # failed; then `native_error` says why).
    native_video: native_bench.NativeBench | None = None
    native_error: str | None = None
    variants: dict = dataclasses.field(default_factory=dict)  # name -> "ok ..." / "FAILED ..."
    old_runtime: str = "not checked"
    gpu: str = "not checked"
    error: str | None = None

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["streams"] = {k: dataclasses.asdict(v) for k, v in self.streams.items()}
        return d

    def native_cell(self) -> str:
        if self.native_video is not None:
            n = self.native_video
            return f"{n.speedup:.2f}x / {n.host_self_us:.1f}"
        return f"FAILED {self.native_error}" if self.native_error else "-"


def preprocessing_flag(preset: str | None) -> str:
    """The convert.py flag a zoo entry needs ("" for a model that rescales itself)."""
    return "" if preset is None else f"--preprocessing={preset}"


def _short(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"


def evaluate(name: str, model_path: str, preset: str | None, data: data_lib.LabelledData,
             out_dir: str, frames: int = 1500, variants=VARIANTS, seed: int = 0,
             progress=print, old_runtime_python: str | None = None,
             memory_choices: dict | None = None, native_cli: str | None = None) -> ZooRow:
    """Converts one zoo model the default way and measures it.

    Args:
      name: the zoo entry's name.
      model_path: its `.keras` file.
      preset: the preprocessing preset it expects outside the graph, or None.
      data: camera pixels (e.g. Fashion-MNIST as loaded; brought to the
        model's input by the converter's rule).
      out_dir: where the .tflite files and memories go.
      frames: frames per stream.
      variants: quantized variants to convert too.
      old_runtime_python: the tflite-runtime 2.14 Python
        (`converters.old_runtime.find_python`).
      memory_choices: `convert_model`'s memory arguments (num_stages,
        pooling, ...) instead of its defaults.
      native_cli: smtm_cli, to measure the native runtime on the video
        frames too (CPU, 1 thread, as the Python harness).
    """
    row = ZooRow(name, preprocessing_flag(preset))
    say = lambda line: progress(f"[{name}] {line}")  # noqa: E731
    try:
        model = kerascompat.load_model(model_path)
        shape = tuple(int(d) for d in model.inputs[0].shape[1:])
        data = data_lib.adapt(data, shape[:2], shape[2])
        preprocessing = prep.resolve(model, preset)
        out = os.path.join(out_dir, f"{name}.smtm.tflite")
        t0 = time.time()
        memory, report = smtm_converter.convert_model(
            model, data, out, memory_output=smtm_converter.memory_path_for(out),
            memory_candidates=[smtm_converter.memory_path_for(out)],
            preprocessing=preprocessing, progress=say, old_runtime_python=old_runtime_python,
            **(memory_choices or {}))
        row.convert_seconds = time.time() - t0
        row.keras_accuracy = report.accuracy.accuracy if report.accuracy else None
        row.stage_shares = tuple(memory.plan.stage_costs)
        if report.stage_times is not None:
            row.time_shares = report.stage_times.shares()
        row.full_vs_keras = report.full_max_abs_diff
        if report.gpu_gate is not None:
            row.gpu = ("fully accelerated" if report.gpu_gate.ok else
                       "no GPU" if not report.gpu_gate.available else "FAILED")
        if report.old_runtime is not None:
            row.old_runtime = "ok" if report.old_runtime.ok else "FAILED"
        with open(out, "rb") as f:
            runtime = SmtmRuntime(f.read(), cpu.CpuBackend(num_threads=1))
        for kind in STREAMS:
            stream = streams_lib.make_stream(kind, data.y_test, frames, seed=seed)
            say(f"{kind}: {frames} frames, full and SMTM interleaved")
            images = stream.render(data.x_test)
            c = validation.compare(runtime, images, stream.labels)
            row.streams[kind] = StreamFigures(
                c.speedup, c.smtm.agreement, c.accuracy_drop, exit_policy.compute_speedup(
                    c.smtm.exit_shares, memory.plan.stage_costs, float(c.checked.mean())),
                validation.steady_share(c.full_predictions, stream.scene_starts),
                c.disagreements)
            if kind == "video":
                row.full_us = c.full.mean_us
                row.host_us = validation.host_work_us(runtime, images)
                if native_cli:
                    say(f"video: {frames} frames on the native runtime ({native_cli} bench)")
                    try:
                        row.native_video = native_bench.bench(native_cli, out, images)
                    except native_bench.NativeBenchError as e:
                        row.native_error = _short(e)
                        say("native runtime FAILED: " + row.native_error)
        for variant in variants:
            vout = os.path.join(out_dir, f"{name}.{variant}.smtm.tflite")
            say(f"converting the {variant} variant")
            try:
                _, vreport = smtm_converter.convert_model(
                    model, data, vout, memory=memory, preprocessing=preprocessing,
                    quantization=quant.parse(variant), gpu_check=False, progress=None,
                    accuracy_check=False, old_runtime_python=old_runtime_python)
                text = f"ok, full top-1 = Keras on {100 * vreport.full_top1_agreement:.0f}%"
                if vreport.old_runtime is not None and not vreport.old_runtime.ok:
                    text += "; tflite-runtime 2.14 FAILED"
                row.variants[variant] = text
            except Exception as e:  # pylint: disable=broad-except
                row.variants[variant] = "FAILED " + _short(e)
    except Exception as e:  # pylint: disable=broad-except
        row.error = _short(e)
        say("FAILED: " + row.error)
        say(traceback.format_exc(limit=3))
    return row


@dataclasses.dataclass
class ScaleRow:
    """The scale check: a large-output model converted from few labelled images."""

    name: str
    classes: int
    input_shape: tuple[int, ...]
    images: int
    convert_seconds: float | None = None
    descriptor_bytes: int | None = None
    model_bytes: int | None = None
    host_us: float | None = None
    full_us: float | None = None
    error: str | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def format(self) -> str:
        if self.error:
            return f"{self.name}: FAILED: {self.error}"
        return (f"{self.name} ({self.classes} classes, input {self.input_shape}, converted "
                f"from {self.images} labelled images covering every class): conversion "
                f"{self.convert_seconds:.0f} s; descriptor {self.descriptor_bytes / 1e6:.2f} MB "
                f"of a {self.model_bytes / 1e6:.1f} MB .tflite; host work per frame "
                f"{self.host_us:.0f} us = {100 * self.host_us / self.full_us:.1f}% of `full` "
                f"({self.full_us:.0f} us)")


def evaluate_scale(name: str, model_path: str, preset: str | None,
                   data: data_lib.LabelledData, out_dir: str, num_images: int = 1200,
                   progress=print) -> ScaleRow:
    """Converts an (untrained) many-class model and measures what grows with K.

    Every class gets labelled images (the data's images, labels dealt out in
    turn), the accuracy check is off (the model is untrained), and the GPU
    gate is skipped (a 224x224 model on a software GPU takes minutes and says
    nothing about scale). Host work is `validation.host_overhead_us`, `full`
    the mean time of `full` on the same frames, through the same harness.
    """
    say = lambda line: progress(f"[{name}] {line}")  # noqa: E731
    row = ScaleRow(name, 0, (), num_images)
    try:
        model = kerascompat.load_model(model_path)
        shape = tuple(int(d) for d in model.inputs[0].shape[1:])
        k = int(model.outputs[0].shape[-1])
        row.classes, row.input_shape = k, shape
        n_test = max(100, num_images // 6)
        x = data_lib.adapt_images(data.x_train[:num_images + n_test], shape[:2], shape[2])
        y = np.arange(len(x)) % k
        scaled = data_lib.LabelledData(x[:num_images], y[:num_images], x[num_images:],
                                       y[num_images:], tuple(str(i) for i in range(k)))
        out = os.path.join(out_dir, f"{name}.smtm.tflite")
        t0 = time.time()
        smtm_converter.convert_model(
            model, scaled, out, preprocessing=prep.resolve(model, preset),
            accuracy_check=False, gpu_check=False, progress=say)
        row.convert_seconds = time.time() - t0
        with open(out, "rb") as f:
            flat = f.read()
        row.model_bytes = len(flat)
        runtime = SmtmRuntime(flat, cpu.CpuBackend(num_threads=1))
        row.descriptor_bytes = len(runtime.descriptor.to_json().encode())
        frames = np.ascontiguousarray(scaled.x_test[:50])
        say("timing host work and full on 50 frames")
        row.host_us = validation.host_work_us(runtime, frames)
        out = validation.run_interleaved([("full", validation.FullOf(runtime))],
                                         validation.model_frames(runtime, frames), warmup=5)
        row.full_us = float(out["full"][2].mean()) / 1e3
    except Exception as e:  # pylint: disable=broad-except
        row.error = _short(e)
        say("FAILED: " + row.error)
    return row


def format_markdown(rows: list[ZooRow]) -> str:
    """The zoo table as markdown."""
    head = ["model", "flag", "Keras acc", "convert s", "stage shares (of time, head last)",
            "full vs Keras"]
    head += [f"{k} speed-up / agree" for k in STREAMS]
    head += ["video compute speed-up", "video host work / full us",
             "video native speed-up / host us",
             "object top-1 vs full / full steady",
             "object disagreements: full wrong / SMTM wrong / both"]
    head += list(VARIANTS) + ["tflite-runtime 2.14", "GPU strict"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if r.error:
            lines.append(f"| {r.name} | {r.preprocessing or '-'} | FAILED: {r.error} |"
                         + " |" * (len(head) - 3))
            continue
        cells = [r.name, r.preprocessing or "-",
                 "-" if r.keras_accuracy is None else f"{100 * r.keras_accuracy:.1f}%",
                 f"{r.convert_seconds:.0f}",
                 "/".join(f"{100 * s:.0f}" for s in r.stage_shares) + (
                     " (" + "/".join(f"{100 * s:.0f}" for s in r.time_shares) + ")"
                     if r.time_shares else ""),
                 f"{r.full_vs_keras:.1e}"]
        for k in STREAMS:
            f = r.streams.get(k)
            cells.append("-" if f is None else f"{f.speedup:.2f}x / {100 * f.agreement:.2f}%")
        video = r.streams.get("video")
        cells.append("-" if video is None or video.compute_speedup is None
                     else f"{video.compute_speedup:.2f}x")
        cells.append("-" if r.host_us is None or r.full_us is None
                     else f"{r.host_us:.1f} / {r.full_us:.0f}")
        cells.append(r.native_cell())
        held = r.streams.get("object")
        cells.append("-" if held is None or held.full_steady is None
                     else f"{-held.accuracy_drop:+.2f} pts / {100 * held.full_steady:.1f}%")
        d = None if held is None else held.disagreements
        cells.append("-" if d is None else f"{100 * d.full_wrong:.2f}% / "
                     f"{100 * d.smtm_wrong:.2f}% / {100 * d.both_wrong:.2f}%")
        cells += [r.variants.get(v, "-") for v in VARIANTS]
        cells += [r.old_runtime, r.gpu]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_results(rows: list[ZooRow], scale: list[ScaleRow], markdown_path: str | None,
                  json_path: str | None, header: str = "") -> None:
    """Writes the table (markdown, with `header` above it) and the figures (JSON)."""
    if markdown_path:
        text = header + format_markdown(rows) + "\n"
        if scale:
            text += "\nScale check:\n\n" + "\n".join(f"- {r.format()}" for r in scale) + "\n"
        io_utils.write_bytes_atomic(markdown_path, text.encode())
    if json_path:
        io_utils.write_bytes_atomic(
            json_path, json.dumps({"models": [r.to_dict() for r in rows],
                                   "scale": [r.to_dict() for r in scale]}, indent=1,
                                  default=lambda o: float(o) if isinstance(
                                      o, np.floating) else str(o)).encode())
