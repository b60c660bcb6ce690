"""scripts/validate.py --native_cli: the harness measures the native runtime too.

Runs the harness on a golden model with the real smtm_cli and checks that each
stream has native figures, and that the native runtime's answers agree with the
full model exactly as the Python runtime's do (the same decisions on the same
frames: the exit shares and the agreement must be equal, timings may differ).

  python3 native/tests/validate_native.py --cli=native/build/smtm_cli
Needs SMTM_GOLDEN_DIR (scripts/golden_traces.py --export_dir) and the
Fashion-MNIST test split; exits 77 (skipped) without the golden folder.
"""

import json
import os
import subprocess
import sys
import tempfile

import golden_args  # native/tests/, beside this script.


def main() -> int:
    args, golden = golden_args.parse()
    streams = ["video", "object"]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "figures.json")
        run = subprocess.run(
            [sys.executable, "scripts/validate.py",
             f"--model={os.path.join(golden, args.model + '.tflite')}",
             f"--stream={','.join(streams)}", "--frames=300", f"--native_cli={args.cli}",
             f"--json_output={out}"], capture_output=True, text=True, check=False)
        print(run.stdout)
        if run.returncode != 0:
            print(f"validate.py --native_cli failed (rc {run.returncode}):\n{run.stderr}")
            return 1
        with open(out) as f:
            figures = json.load(f)
    if "native runtime on the same frames" not in run.stdout:
        print("validate.py printed no native table.")
        return 1
    for entry in figures:
        native, python = entry.get("native"), entry["smtm"]
        if native is None or native["frames"] != 300:
            print(f"{entry['stream']}: no native figures for 300 frames: {native}")
            return 1
        if abs(native["agreement_with_full"] - python["agreement"]) > 1e-4 or any(
                abs(a - b) > 1e-3 for a, b in zip(native["exit_shares"], python["exit_shares"])):
            print(f"{entry['stream']}: native decisions differ from Python's: agreement "
                  f"{native['agreement_with_full']} vs {python['agreement']}, exit shares "
                  f"{native['exit_shares']} vs {python['exit_shares']}")
            return 1
    print(f"validate.py --native_cli OK on {args.model} {', '.join(streams)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
