#!/bin/sh
# Bazel's Python interpreter: whatever `python3` is on PATH (see BUILD).
exec python3 "$@"
