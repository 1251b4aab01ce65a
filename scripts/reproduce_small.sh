#!/usr/bin/env bash
# The small-scale reproduction study (dense vs SMoE vs X-MoE): installs what is missing, then runs
# scripts/reproduce_small.py with the arguments given (see --help). Examples:
#   scripts/reproduce_small.sh                                   # default study, writes docs/results.md
#   scripts/reproduce_small.sh --quick --out /tmp/reproduce      # < 3 min, toy corpus (CI)
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$(realpath -m "${XMOE_VENV:-$REPO_ROOT/.venv}")"
"$REPO_ROOT/scripts/install.sh"
args=("$@")
if [[ " $* " != *" --quick "* && " $* " != *" --results-md "* ]]; then
    args+=(--results-md "$REPO_ROOT/docs/results.md")
fi
# The report quotes the command as typed here, not the python call below.
export XMOE_REPRODUCE_COMMAND="scripts/reproduce_small.sh${*:+ $*}"
echo "[reproduce_small] $VENV/bin/python $REPO_ROOT/scripts/reproduce_small.py ${args[*]}"
exec "$VENV/bin/python" "$REPO_ROOT/scripts/reproduce_small.py" "${args[@]}"
