"""What the native tests' Python scripts share: their flags and the golden export.

Each runs as `python3 native/tests/<script>.py --cli=PATH [--model=M] [--kind=K]`
from the repository root (ctest does), reading the export of
`scripts/golden_traces.py --export_dir` named by SMTM_GOLDEN_DIR.
"""

import argparse
import os
import sys

SKIPPED = 77  # ctest's SKIP_RETURN_CODE for these tests.


def parse(default_kind: str = "video") -> tuple[argparse.Namespace, str]:
    """The flags and the golden folder; exits with SKIPPED when SMTM_GOLDEN_DIR is unset."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--cli", required=True, help="smtm_cli built by cmake.")
    parser.add_argument("--model", default="demo_resnet", help="A demo model of the export.")
    parser.add_argument("--kind", default=default_kind, help="A stream kind of the export.")
    args = parser.parse_args()
    golden = os.environ.get("SMTM_GOLDEN_DIR")
    if not golden:
        print("SMTM_GOLDEN_DIR not set: skipped")
        sys.exit(SKIPPED)
    return args, golden
