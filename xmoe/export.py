"""`xmoe-export CHECKPOINT OUTDIR`: a fairseq checkpoint -> a self-contained model folder.

    OUTDIR/config.json              transformers config (model_type "xmoe", auto_map) holding
                                    every EncoderConfig field, the language codes and the
                                    fine-tuning settings (default_language, freeze_moe, ...)
    OUTDIR/model.safetensors        all weights, every expert of every MoE layer, keys "encoder.*";
                                    the MLM head's projection is the token embedding, stored once
    OUTDIR/tokenizer.json           the standard transformers tokenizer (PreTrainedTokenizerFast),
                                    giving the pre-training ids (xmoe/hf/tokenization.py)
    OUTDIR/tokenizer_config.json    its settings, plus the files and languages xmoe.tokenizer reads
    OUTDIR/sentencepiece.model      the pre-training sentencepiece model
    OUTDIR/dict.txt                 the pre-training fairseq dictionary (`<mask>` is appended on load)
    OUTDIR/configuration_xmoe.py, modeling_xmoe.py, encoder.py, moe*.py, heads_layers.py, tokenizer.py
                                    the code, copied from this package at export time with
                                    `xmoe.*` imports rewritten to relative ones (transformers'
                                    remote code must be flat files importing each other by `.name`)

Load it with `xmoe.hub.load(OUTDIR)` (torch only) or with transformers: `AutoTokenizer` (no
remote code) and, with trust_remote_code=True, `AutoModel`, `AutoModelForMaskedLM`,
`AutoModelForSequenceClassification`, `AutoModelForTokenClassification`.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

import xmoe

PACKAGE_DIR = Path(xmoe.__file__).resolve().parent
EXIT_BAD_INPUT = 2

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
# The weights of the tied MLM projection live under the token embedding's name only.
TIED_KEY, TIED_SOURCE_KEY = "lm_head.weight", "embed_tokens.weight"
WEIGHT_PREFIX = "encoder."  # the HF models hold the network as `self.encoder`

# The remote-code entry points; everything they import from xmoe is copied along.
REMOTE_CODE_ROOTS = ("xmoe.hf.configuration_xmoe", "xmoe.hf.modeling_xmoe", "xmoe.tokenizer")
AUTO_MAP = {
    "AutoConfig": "configuration_xmoe.XMoEConfig",
    "AutoModel": "modeling_xmoe.XMoEModel",
    "AutoModelForMaskedLM": "modeling_xmoe.XMoEForMaskedLM",
    "AutoModelForSequenceClassification": "modeling_xmoe.XMoEForSequenceClassification",
    "AutoModelForTokenClassification": "modeling_xmoe.XMoEForTokenClassification",
}


class ExportError(Exception):
    """Bad input: reported as one message, exit status 2, no traceback."""


# ---- remote code, generated from the package ---------------------------------------------------
def flat_module_name(module: str) -> str:
    """xmoe.encoder -> encoder, xmoe.moe -> moe, xmoe.moe.layer -> moe_layer,
    xmoe.hf.modeling_xmoe -> modeling_xmoe: the file name (without .py) in the exported folder."""
    parts = module.split(".")
    if parts[0] != "xmoe" or len(parts) < 2:
        raise ValueError(f"not an xmoe module: {module}")
    if parts[1] == "hf":
        return "_".join(parts[2:])
    return "_".join(parts[1:])


def module_source_path(module: str) -> Path:
    relative = Path(*module.split(".")[1:])
    package_init = PACKAGE_DIR / relative / "__init__.py"
    return package_init if package_init.is_file() else (PACKAGE_DIR / relative).with_suffix(".py")


def rewrite_xmoe_imports(source: str, origin: str) -> tuple[str, list[str]]:
    """(source with every `from xmoe.a.b import ...` statement turned into `from .a_b import ...`,
    the xmoe modules it imported). Only import statements change (found by parsing, so a
    docstring that shows an import stays as written); lazy imports inside functions count too."""
    lines = source.splitlines(keepends=True)
    modules = []
    for node in ast.walk(ast.parse(source, origin)):
        if isinstance(node, ast.Import) and any(a.name.split(".")[0] == "xmoe" for a in node.names):
            raise ValueError(f"{origin}:{node.lineno}: write 'from xmoe.x import y' (export rewrites only that form)")
        if not isinstance(node, ast.ImportFrom):
            continue
        if node.level > 0:
            raise ValueError(f"{origin}:{node.lineno}: relative imports cannot be exported; use 'from xmoe.x import y'")
        if node.module and node.module.split(".")[0] == "xmoe":
            line = lines[node.lineno - 1]
            pattern = rf"^(\s*)from\s+{re.escape(node.module)}\s+import\b"
            rewritten, count = re.subn(pattern, rf"\1from .{flat_module_name(node.module)} import", line)
            if count != 1:
                raise ValueError(f"{origin}:{node.lineno}: keep 'from {node.module} import' on one line")
            lines[node.lineno - 1] = rewritten
            modules.append(node.module)
    return "".join(lines), modules


def remote_code_sources() -> dict[str, str]:
    """{file name: text} of the remote code: the roots and every xmoe module they need,
    transitively, with `from xmoe.a.b import` rewritten to `from .a_b import`."""
    files: dict[str, str] = {}
    pending = list(REMOTE_CODE_ROOTS)
    while pending:
        module = pending.pop()
        name = flat_module_name(module) + ".py"
        if name in files:
            continue
        path = module_source_path(module)
        rewritten, imported = rewrite_xmoe_imports(path.read_text(encoding="utf-8"), str(path))
        pending.extend(imported)
        origin = path.relative_to(PACKAGE_DIR.parent).as_posix()
        header = f"# Generated by xmoe-export {xmoe.__version__} from {origin}; edit the package, not this copy.\n"
        files[name] = header + rewritten
    return files


# ---- inputs ---------------------------------------------------------------------------------
def resolve_tokenizer_files(
    spm_model: Optional[str], dict_path: Optional[str], data_dir: Optional[str], checkpoint_cfg: dict
) -> tuple[str, str, Optional[list[str]]]:
    """(sentencepiece model, dict.txt, language codes or None) from --spm-model/--dict, from
    --data, or from the data folder the checkpoint was trained on."""
    if (spm_model is None) != (dict_path is None):
        raise ExportError("--spm-model and --dict go together")
    if spm_model is not None and data_dir is not None:
        raise ExportError("give either --data or --spm-model and --dict, not both")
    source = "--data"
    if spm_model is None and data_dir is None:
        data_dir = ((checkpoint_cfg.get("task") or {}).get("data") or "").split(os.pathsep)[0] or None
        source = "the checkpoint's task.data"
        if data_dir is None or not os.path.isdir(data_dir):
            raise ExportError(
                f"no tokenizer given and {source} ({data_dir!r}) is not a folder here: "
                "pass --data DATA_DIR or --spm-model PATH --dict PATH"
            )
    languages = None
    if data_dir is not None:
        manifest_path = os.path.join(data_dir, "manifest.json")
        manifest: dict[str, Any] = {}
        if os.path.isfile(manifest_path):
            try:
                with open(manifest_path, encoding="utf-8") as f:
                    manifest = json.load(f)
            except (OSError, ValueError) as error:
                raise ExportError(f"cannot read {manifest_path}: {error}") from None
            languages = manifest.get("languages")
        spm_model = os.path.join(data_dir, manifest.get("spm_model", "spm.model"))
        dict_path = os.path.join(data_dir, manifest.get("dictionary", "dict.txt"))
        for path, what in ((spm_model, "sentencepiece model"), (dict_path, "dictionary")):
            if not os.path.isfile(path):
                raise ExportError(f"{source} {data_dir}: no {what} {path}; pass --spm-model PATH --dict PATH")
    for path, what in ((spm_model, "sentencepiece model"), (dict_path, "dictionary")):
        if not os.path.isfile(path):
            raise ExportError(f"{what} {path} does not exist")
    return spm_model, dict_path, languages


def check_output_dir(out_dir: Path, force: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise ExportError(f"{out_dir} exists and is not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not force:
        raise ExportError(f"{out_dir} exists and is not empty; pass --force to replace it")


# ---- the export ------------------------------------------------------------------------------
def export_weights(encoder: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The encoder's weights under the exported names: every expert, the tied projection once."""
    state = encoder.state_dict()
    if state[TIED_KEY].data_ptr() != state[TIED_SOURCE_KEY].data_ptr():
        raise ExportError("the MLM head's projection is not tied to the token embeddings")
    return {WEIGHT_PREFIX + k: v.detach().contiguous() for k, v in state.items() if k != TIED_KEY}


def build_config(encoder_cfg, languages: Optional[list[str]], source: dict[str, Any]) -> dict[str, Any]:
    config = {
        "model_type": "xmoe",
        "architectures": ["XMoEForMaskedLM"],
        "auto_map": AUTO_MAP,
        **encoder_cfg.to_dict(),
        "languages": languages,
        # what models with language embeddings use without a language_ids input (pipelines)
        "default_language": _default_language(encoder_cfg, languages),
        "freeze_moe": None,  # each class's default: task heads freeze router and experts
        "balance_loss_weight": 0.01,  # the paper's alpha, pre-training's default
        "bos_token_id": 0,
        "unk_token_id": 3,
        "pad_token_id": encoder_cfg.padding_idx,
        "eos_token_id": 2,
        "tie_word_embeddings": True,
        "dtype": "float32",
        "xmoe_version": xmoe.__version__,
        "xmoe_source": source,
    }
    return config


def _default_language(encoder_cfg, languages: Optional[list[str]]):
    if not encoder_cfg.num_languages:
        return None
    return languages[0] if languages else 0


def export(
    checkpoint: str,
    out_dir: str,
    spm_model: Optional[str] = None,
    dict_path: Optional[str] = None,
    data_dir: Optional[str] = None,
    force: bool = False,
    verify: bool = True,
    log=print,
) -> Path:
    """Write the folder described in the module docstring; returns its path. Raises ExportError."""
    from safetensors.torch import save_file

    from xmoe.checkpoint import load_encoder
    from xmoe.hf.tokenization import build_fast_tokenizer
    from xmoe.tokenizer import XMoETokenizer

    out = Path(out_dir)
    check_output_dir(out, force)
    if not os.path.isfile(checkpoint):
        raise ExportError(f"checkpoint {checkpoint} does not exist")
    try:
        encoder, encoder_cfg, checkpoint_cfg = load_encoder(checkpoint)
    except (OSError, ValueError, KeyError, RuntimeError) as error:
        raise ExportError(str(error)) from None
    spm_model, dict_path, languages = resolve_tokenizer_files(spm_model, dict_path, data_dir, checkpoint_cfg)
    try:
        tokenizer = XMoETokenizer(spm_model, dict_path, languages, encoder_cfg.max_positions)
        tokenizer.check_dictionary_matches_model()
    except (ValueError, OSError) as error:
        raise ExportError(str(error)) from None
    try:
        fast_tokenizer = build_fast_tokenizer(spm_model, dict_path, encoder_cfg.max_positions)
    except (ValueError, OSError) as error:
        raise ExportError(f"cannot build tokenizer.json: {error}") from None
    if len(fast_tokenizer) > len(tokenizer):
        log(f"note: {len(fast_tokenizer) - len(tokenizer)} pieces of {spm_model} are not in {dict_path}: "
            f"tokenizer.json gives them ids >= {len(tokenizer)}, which the model reads as <unk> (as pre-training did)")
    if len(tokenizer) != encoder_cfg.vocab_size:
        raise ExportError(
            f"{dict_path} gives {len(tokenizer)} ids (with <s> <pad> </s> <unk> in front and <mask> appended) "
            f"but the checkpoint's embeddings have {encoder_cfg.vocab_size} rows: this is not the dictionary "
            "the model was trained with"
        )
    if languages is not None and encoder_cfg.num_languages and len(languages) > encoder_cfg.num_languages:
        raise ExportError(
            f"the manifest lists {len(languages)} languages but the model embeds only {encoder_cfg.num_languages}"
        )

    if languages is None and encoder_cfg.num_languages:
        log(f"note: the model embeds {encoder_cfg.num_languages} languages but no manifest.json names them: "
            "users will pass language ids, not codes (export with --data DATA_DIR to record the codes)")

    weights = export_weights(encoder)  # load_encoder has checked that every expert is there
    source = {"checkpoint": os.path.abspath(checkpoint)}

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.export-", dir=out.parent))
    try:
        save_file(weights, str(staging / WEIGHTS_FILE), metadata={"format": "pt", "xmoe_version": xmoe.__version__})
        _write_json(staging / CONFIG_FILE, build_config(encoder_cfg, languages, source))
        fast_tokenizer.save_pretrained(str(staging))
        _set_tokenizer_class(staging / TOKENIZER_CONFIG_FILE)
        tokenizer.save_pretrained(str(staging))  # adds the sentencepiece model, dict.txt, languages
        for name, text in remote_code_sources().items():  # tokenizer.py included
            (staging / name).write_text(text, encoding="utf-8")
        _apply_umask(staging)
        if verify:
            difference = _verify(staging, encoder, tokenizer)
            log(f"verified: xmoe.hub.load gives the checkpoint's features (max abs difference {difference:.2e})")
        _replace_folder(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    num_experts = sum(t.shape[0] for k, t in weights.items() if k.endswith(".ffn.experts.w1_EDF"))
    log(
        f"exported {checkpoint} -> {out}: {len(weights)} tensors, "
        f"{sum(t.numel() for t in weights.values()):,} parameters, "
        f"{len(encoder_cfg.moe_layer_indices)} MoE layers with {num_experts} experts in all"
    )
    return out


def _write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def _set_tokenizer_class(path: Path) -> None:
    # transformers 5 writes its new base class name; PreTrainedTokenizerFast loads in 4.x and 5.x.
    settings = json.loads(path.read_text(encoding="utf-8"))
    settings["tokenizer_class"] = "PreTrainedTokenizerFast"
    settings.pop("backend", None)
    _write_json(path, settings)


def _verify(folder: Path, encoder: torch.nn.Module, tokenizer) -> float:
    """Reload the staged folder with xmoe.hub and compare features on a sample sentence."""
    from xmoe import hub

    sample = tokenizer.batch(["xmoe export check: the quick brown fox.", "a second, shorter line"])
    with torch.no_grad():
        expected, _ = encoder.eval()(sample.src_tokens, features_only=True)
        reloaded = hub.load(str(folder))
        got, _ = reloaded.encoder(sample.src_tokens, features_only=True)
    keep = ~sample.padding_mask.unsqueeze(-1)
    difference = float((expected - got).abs().masked_fill(~keep, 0).max())
    if difference > 1e-5:
        raise ExportError(f"the exported model's features differ from the checkpoint's by {difference:.2e}")
    return difference


def _apply_umask(folder: Path) -> None:
    # mkdtemp makes the folder private (0700); give the export the modes of a normal folder.
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for path in folder.iterdir():
        path.chmod(0o666 & ~umask)


def _replace_folder(staging: Path, out: Path) -> None:
    """Move the staged folder to `out`; an existing `out` is moved aside first and removed only
    once the new one is in place."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.rename(out, old)
    os.rename(staging, out)
    if old is not None:
        shutil.rmtree(old)


# ---- command line ----------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="xmoe-export",
        description="Export an xmoe_encoder fairseq checkpoint (all experts, whatever world size trained it) "
        "to a self-contained folder loadable by xmoe.hub.load and transformers.AutoModel "
        "(trust_remote_code=True).",
        epilog="example: xmoe-export checkpoints/checkpoint_best.pt exported/xmoe-base --data data-bin",
    )
    parser.add_argument("checkpoint", help="fairseq checkpoint of an xmoe_encoder model (e.g. checkpoint_best.pt)")
    parser.add_argument("out_dir", metavar="OUTDIR", help="folder to write; must not exist or be empty (see --force)")
    parser.add_argument(
        "--data",
        metavar="DATA_DIR",
        help="binarized data folder the model was trained on (manifest.json, spm.model, dict.txt); "
        "default: the checkpoint's task.data when that folder exists",
    )
    parser.add_argument("--spm-model", metavar="PATH", help="sentencepiece model (instead of --data; needs --dict)")
    parser.add_argument("--dict", metavar="PATH", help="fairseq dict.txt of the model (instead of --data)")
    parser.add_argument("--force", action="store_true", help="replace OUTDIR if it exists and is not empty")
    parser.add_argument(
        "--no-verify",
        action="store_true",
        help="skip reloading the export and comparing its features with the checkpoint's",
    )
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        export(args.checkpoint, args.out_dir, args.spm_model, args.dict, args.data, args.force, not args.no_verify)
    except ExportError as error:
        print(f"xmoe-export: error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return 0


def cli() -> None:
    sys.exit(main())


if __name__ == "__main__":
    cli()
