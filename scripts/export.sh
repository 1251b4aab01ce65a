#!/usr/bin/env bash
# Export a trained xmoe_encoder checkpoint to a self-contained folder (config.json,
# model.safetensors with every expert, sentencepiece model + dictionary, modeling code) that
# xmoe.hub.load and transformers' AutoModel (trust_remote_code=True) both load.
#
#   scripts/export.sh CHECKPOINT OUTDIR [--data DATA_DIR | --spm-model PATH --dict PATH] [--force]
#   scripts/export.sh --help
#
# Arguments go to `python -m xmoe.export` (the xmoe-export command) unchanged; the command is
# printed first. Exit status 2 = bad input (the message says which).
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$(realpath -m "${XMOE_VENV:-$REPO_ROOT/.venv}")"
PY="$VENV/bin/python"
[[ -x "$PY" ]] || PY="$(command -v python3)"

# Relative paths stay relative to the caller's folder; the checkout is importable from anywhere.
export PYTHONPATH="$REPO_ROOT${PYTHONPATH:+:$PYTHONPATH}"
command=("$PY" -m xmoe.export "$@")
echo "[export] $(printf '%q ' "${command[@]}")"
exec "${command[@]}"
