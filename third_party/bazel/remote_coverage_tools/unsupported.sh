#!/bin/sh
echo "bazel coverage is not set up for smtm_tf (stub @remote_coverage_tools)." >&2
exit 1
