"""State files cross between the Python and native runtimes, both ways.

Python runs a stream's first part and saves its memory; the native CLI
restores that file, classifies the next part (it must decide as Python does
after the same restore) and saves; Python restores the native file and
classifies the last part, again deciding as the uninterrupted Python run.

  python3 native/tests/state_roundtrip.py --cli=native/build-app/smtm_cli
Needs SMTM_GOLDEN_DIR (scripts/golden_traces.py --export_dir); exits 77
(skipped) without it.
"""

import os
import subprocess
import sys
import tempfile

import numpy as np

import golden_args  # native/tests/, beside this script.

sys.path.insert(0, os.getcwd())
from smtm_tf.runtime import SmtmRuntime  # noqa: E402  pylint: disable=wrong-import-position


def main() -> int:
    args, golden = golden_args.parse()
    model = os.path.join(golden, args.model + ".tflite")
    frames = np.load(os.path.join(golden, args.model, args.kind + ".frames.npy"))
    a, b, c = np.array_split(frames, 3)
    with open(model, "rb") as f:
        content = f.read()
    with tempfile.TemporaryDirectory() as tmp:
        state = os.path.join(tmp, "state.npz")
        py = SmtmRuntime(content)
        for frame in a:
            py.classify(frame)
        py.save_state(state)
        want_b = [tuple(py.classify(frame).__dict__.values()) for frame in b]
        want_c = [tuple(py.classify(frame).__dict__.values()) for frame in c]

        frames_b = os.path.join(tmp, "b.npy")
        np.save(frames_b, np.ascontiguousarray(b, np.float32))
        run = subprocess.run([args.cli, "classify", f"--model={model}", f"--frames={frames_b}",
                              f"--state={state}"], capture_output=True, text=True, check=False)
        if run.returncode != 0 or "Ignoring" in run.stderr:
            print(f"native CLI did not restore Python's state: rc {run.returncode}\n{run.stderr}")
            return 1
        got_b = [tuple(int(v) for v in line.split()) for line in run.stdout.splitlines()]
        if got_b != want_b:
            bad = next(i for i, (g, w) in enumerate(zip(got_b, want_b)) if g != w)
            print(f"Python -> native: frame {bad} native {got_b[bad]} vs Python {want_b[bad]}")
            return 1

        back = SmtmRuntime(content)
        if not back.load_state(state):
            print("Python did not restore the native runtime's state file.")
            return 1
        got_c = [tuple(back.classify(frame).__dict__.values()) for frame in c]
        if got_c != want_c:
            bad = next(i for i, (g, w) in enumerate(zip(got_c, want_c)) if g != w)
            print(f"native -> Python: frame {bad} Python-after-native {got_c[bad]} vs "
                  f"uninterrupted {want_c[bad]}")
            return 1
    print(f"state round trip OK on {args.model} {args.kind}: {len(b)} + {len(c)} frames "
          f"decided identically after each restore")
    return 0


if __name__ == "__main__":
    sys.exit(main())
