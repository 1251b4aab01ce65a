#!/usr/bin/env bash
# Install what is missing (fast no-op when present), then run the whole test suite.
#   scripts/test.sh                    # everything (GPU tests skip, with a reason, without a GPU)
#   scripts/test.sh -m "not slow"      # extra arguments go to pytest
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$(realpath -m "${XMOE_VENV:-$REPO_ROOT/.venv}")"

"$REPO_ROOT/scripts/install.sh"

cd "$REPO_ROOT"
# -rs lists the reason of every skipped test (e.g. "no CUDA device"); --durations shows where
# the time goes.
exec "$VENV/bin/python" -m pytest -rs --durations=25 "$@"
