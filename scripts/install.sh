#!/usr/bin/env bash
# Idempotent installer for xmoe: a virtual environment with torch, fairseq-fixed and xmoe.
#
#   scripts/install.sh                  # venv in <repo>/.venv
#   XMOE_VENV=/path/to/venv scripts/install.sh
#   XMOE_PYTHON=python3.11 scripts/install.sh   # interpreter that creates the venv
#   XMOE_SYSTEM_SITE_PACKAGES=1 scripts/install.sh   # new venv sees the system's torch
#
# Each slow step is preceded by a quick import probe, so a second run is a fast no-op.
# torch: an existing torch is always kept (GPU users bring their own CUDA build). Without one
# we install torch==$XMOE_TORCH_VERSION; here that resolves to the CPU wheel on local disk.
# Every later pip call is constrained to the installed torch version, so no dependency can
# swap it for a multi-GB CUDA download.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$(realpath -m "${XMOE_VENV:-$REPO_ROOT/.venv}")"
BASE_PYTHON="${XMOE_PYTHON:-python3}"
TORCH_VERSION="${XMOE_TORCH_VERSION:-2.13.0}"
FAIRSEQ_REQUIREMENT="fairseq-fixed==0.12.3.1"

say() { echo "[install] $*"; }

if [[ ! -x "$VENV/bin/python" ]]; then
    say "creating virtual environment $VENV with $BASE_PYTHON"
    if [[ "${XMOE_SYSTEM_SITE_PACKAGES:-0}" == 1 ]]; then
        "$BASE_PYTHON" -m venv --system-site-packages "$VENV"
    else
        "$BASE_PYTHON" -m venv "$VENV"
    fi
else
    say "using virtual environment $VENV"
fi
PY="$VENV/bin/python"
PIP=("$PY" -m pip --disable-pip-version-check)

# What is already there, found from package metadata and file locations without importing
# anything (importing torch and fairseq takes seconds; a no-op run should not).
# Prints one word per missing step: torch, build-tools, fairseq, torchaudio, xmoe.
missing_steps() {
    (cd / && "$PY" - "$REPO_ROOT" <<'PYEOF'
import glob, json, os, sys
from importlib import metadata, util

repo = os.path.realpath(sys.argv[1])
def present(*modules):
    return all(util.find_spec(m) is not None for m in modules)
missing = []
if not present("torch"):
    missing.append("torch")
if not present("numpy", "Cython", "wheel", "setuptools"):
    missing.append("build-tools")
spec = util.find_spec("fairseq")
if spec is None or not glob.glob(os.path.join(os.path.dirname(spec.origin), "data", "data_utils_fast*.so")):
    missing.append("fairseq")  # absent, or built without its compiled extensions
try:
    url = json.loads(metadata.distribution("xmoe").read_text("direct_url.json") or "{}")
    editable_here = url.get("dir_info", {}).get("editable") and os.path.realpath(
        url.get("url", "").removeprefix("file://")) == repo
except metadata.PackageNotFoundError:
    editable_here = False
# An editable install made before setup.py gained a console script lacks that script.
import re
scripts = re.findall(r'"([a-z][a-z0-9-]*) = [a-z_.]+:[a-z_]+"', open(os.path.join(repo, "setup.py")).read())
scripts_missing = [s for s in scripts if not os.path.exists(os.path.join(os.path.dirname(sys.executable), s))]
# fairseq-fixed pulls the newest torchaudio, a build for another torch whose compiled library
# fails to load; see the removal step below. torchaudio X.Y is built for torch X.Y.
try:
    same_release = lambda a, b: a.split("+")[0].split(".")[:2] == b.split("+")[0].split(".")[:2]
    if not same_release(metadata.version("torchaudio"), metadata.version("torch")):
        missing.append("torchaudio")
except metadata.PackageNotFoundError:
    pass
if not editable_here or scripts_missing or not present("sentencepiece", "tensorboard", "hydra", "safetensors",
                                                       "transformers", "accelerate", "matplotlib", "pytest"):
    missing.append("xmoe")
print(" ".join(missing))
PYEOF
    )
}
needs() { [[ " $MISSING " == *" $1 "* ]]; }
version_of() { "$PY" -c "from importlib.metadata import version; print(version('$1'))" 2>/dev/null || echo unknown; }

MISSING="$(missing_steps)"
say "missing: ${MISSING:-nothing}"

if needs torch; then
    say "installing torch==$TORCH_VERSION"
    "${PIP[@]}" install "torch==$TORCH_VERSION"
else
    say "keeping torch $(version_of torch)"
fi

# Pin torch (version only, so a CUDA build stays a CUDA build) for every later step.
CONSTRAINTS="$VENV/xmoe-constraints.txt"
echo "torch==$(version_of torch | cut -d+ -f1)" >"$CONSTRAINTS"
say "constraint for later steps: $(cat "$CONSTRAINTS")"

if needs build-tools; then
    say "installing build tools: numpy cython wheel setuptools"
    "${PIP[@]}" install -c "$CONSTRAINTS" numpy cython wheel setuptools
fi

# fairseq compiles C++/Cython extensions against the torch in this venv (about 2 minutes);
# --no-build-isolation stops pip from building it against a torch it downloads itself.
if needs fairseq; then
    say "installing $FAIRSEQ_REQUIREMENT (--no-build-isolation; compiles extensions, ~2 min)"
    "${PIP[@]}" install -c "$CONSTRAINTS" --no-build-isolation "$FAIRSEQ_REQUIREMENT"
else
    say "fairseq present ($(version_of fairseq-fixed))"
fi

# Editable install of this checkout (a venv pointing at another checkout is re-pointed).
if needs xmoe; then
    say "installing xmoe (editable) with extras export,plot,test"
    "${PIP[@]}" install -c "$CONSTRAINTS" --no-build-isolation -e "$REPO_ROOT[export,plot,test]"
else
    say "xmoe present (editable install of $REPO_ROOT, extras included)"
fi

# torchaudio: fairseq-fixed lists it (for its speech tasks) and pip installs the newest release,
# built for another torch: its _torchaudio.so fails to load, and transformers imports torchaudio
# whenever it is installed (its pipelines and audio utilities), so `from transformers import
# pipeline` breaks. No torchaudio build matches torch 2.13, and the text path (fairseq's
# masked_lm, xmoe, transformers' text pipelines) never imports it: remove a mismatched one.
# A torchaudio of the same release as torch (a GPU user's matching pair) is kept. The check
# runs on every call, so it also repairs a venv made before this step existed.
MISSING="$(missing_steps)"
if needs torchaudio; then
    say "removing torchaudio $(version_of torchaudio): built for another torch than $(version_of torch), unused by the text path"
    "${PIP[@]}" uninstall -y torchaudio
fi

say "done: torch $(version_of torch), fairseq-fixed $(version_of fairseq-fixed), xmoe $(version_of xmoe) in $VENV"
