#!/usr/bin/env bash
# The default test suite (the slow tier: scripts/test.sh -m slow). pytest's exit code is kept:
# 5 (no test collected) fails this script like any other failure.
source "$(dirname "$0")/env.sh"
exec python -m pytest -q -p no:cacheprovider --durations=15 "$@"
