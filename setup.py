"""Packaging for xmoe, a fairseq plugin (`--user-dir xmoe`) for X-MoE encoders.

fairseq itself (the `fairseq-fixed` release, import name `fairseq`) is installed by
scripts/install.sh rather than listed here: it must be built with
`--no-build-isolation` against the torch already present, which an install_requires
entry cannot ask for.
"""

import re
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent


def read_version() -> str:
    # One source of truth: xmoe/__init__.py. Read as text so that setup.py never imports
    # the package (and with it torch) at build time.
    text = (ROOT / "xmoe" / "__init__.py").read_text(encoding="utf-8")
    return re.search(r'^__version__ = "([^"]+)"', text, re.M).group(1)


setup(
    name="xmoe",
    version=read_version(),
    description=(
        "fairseq plugin for pre-training cross-lingual sparse mixture-of-experts "
        "encoders with X-MoE routing"
    ),
    long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=find_packages(include=["xmoe", "xmoe.*"]),
    # torch is deliberately unpinned and unconstrained to a build: users with GPUs bring
    # their own CUDA wheel, and install.sh keeps whatever torch is already there.
    install_requires=[
        "torch>=2.0",
        "numpy",
        "sentencepiece",
        "tensorboard",
        "hydra-core>=1.3",
        "scikit-learn",  # TF-IDF baselines of xmoe-analyze (also a fairseq dependency)
    ],
    extras_require={
        # accelerate: transformers.Trainer needs it (fine-tuning an export, xmoe-finetune)
        "export": ["safetensors", "transformers", "accelerate"],
        "plot": ["matplotlib"],
        "test": ["pytest"],
    },
    entry_points={
        "console_scripts": [
            "xmoe-export = xmoe.export:cli",
            "xmoe-finetune = xmoe.finetune:cli",
            "xmoe-analyze = xmoe.analysis.cli:main",
            "xmoe-upcycle = xmoe.checkpoints.upcycle:cli",
        ]
    },
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
