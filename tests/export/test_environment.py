"""The environment scripts/install.sh makes runs transformers' pipelines: no torchaudio built
for another torch is left behind (fairseq-fixed pulls one; transformers imports it when present)."""

from __future__ import annotations

import os
import subprocess
import sys
from importlib import metadata


def test_transformers_pipeline_imports_in_the_installed_venv():
    # A fresh interpreter, so the import really happens (and fails as a user would see it).
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    code = "import transformers.pipelines; from transformers import pipeline; print(pipeline.__name__)"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip() == "pipeline"


def test_no_torchaudio_of_another_torch_release():
    try:
        torchaudio_version = metadata.version("torchaudio")
    except metadata.PackageNotFoundError:
        return  # removed by scripts/install.sh: the text path never needs it
    release = lambda v: v.split("+")[0].split(".")[:2]  # noqa: E731
    assert release(torchaudio_version) == release(metadata.version("torch"))
