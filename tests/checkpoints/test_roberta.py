"""A fairseq RoBERTa / XLM-R checkpoint as the source of xmoe-upcycle. The RoBERTa models are
built by fairseq itself (tiny, random weights, no download) and saved as fairseq saves them."""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

import pytest
import torch
from fairseq.data import Dictionary
from fairseq.models.roberta import RobertaModel
from fairseq.models.roberta.model import base_architecture, roberta_prenorm_architecture

from data_prep.dataprep_helpers import run_script, write_raw_corpus
from lifecycle.lifecycle_helpers import losses
from xmoe.checkpoint import load_encoder
from xmoe.checkpoints.upcycle import main, upcycle

from .test_upcycle import fix_gates_to_one

MAX_POSITIONS = 40


def tiny_roberta(dictionary: Dictionary, prenorm: bool = False, **options) -> RobertaModel:
    """A 3-layer RoBERTa built by fairseq, every parameter randomised (fairseq initialises
    LayerNorms to 1/0 and biases to 0, which would hide a mapping mistake)."""
    args = argparse.Namespace(
        arch="roberta_prenorm" if prenorm else "roberta",
        encoder_layers=3, encoder_embed_dim=32, encoder_ffn_embed_dim=48, encoder_attention_heads=4,
        max_positions=MAX_POSITIONS, **options,
    )
    (roberta_prenorm_architecture if prenorm else base_architecture)(args)
    torch.manual_seed(0)
    model = RobertaModel.build_model(args, argparse.Namespace(source_dictionary=dictionary))
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.1 * torch.randn_like(param))
    return model.eval()


def save_like_fairseq(model: RobertaModel, path: Path, old_format: bool = False) -> Path:
    """The checkpoint layout fairseq-train writes for a roberta model (the config of
    add_args-style models is an argparse.Namespace). old_format: the names and layout of
    checkpoints from 2019 (XLM-R's era): decoder.*, emb_layer_norm, fused in_proj."""
    weights = dict(model.state_dict())
    state = {
        "cfg": {"model": model.args, "task": {"_name": "masked_lm"}},
        "model": weights,
        "optimizer_history": [{"criterion_name": "MaskedLmLoss", "optimizer_name": "FairseqAdam",
                               "lr_scheduler_state": {}, "num_updates": 100}],
        "extra_state": {"train_iterator": {"epoch": 1}},
    }
    if old_format:
        old = {}
        for key, value in weights.items():
            key = "decoder." + key[len("encoder."):] if key.startswith("encoder.") else key
            old[key.replace(".layernorm_embedding.", ".emb_layer_norm.")] = value
        for key in [k for k in old if k.endswith("self_attn.q_proj.weight")]:
            prefix = key[: -len("q_proj.weight")]
            for name in ("weight", "bias"):
                parts = [old.pop(f"{prefix}{p}_proj.{name}") for p in "qkv"]
                old[f"{prefix}in_proj_{name}"] = torch.cat(parts)
        state = {"args": model.args, "model": old, "optimizer_history": state["optimizer_history"],
                 "extra_state": state["extra_state"]}
    torch.save(state, path)
    return path


@pytest.fixture(scope="module")
def dictionary() -> Dictionary:
    """A dictionary as fairseq's masked_lm task makes it: dict.txt's words plus <mask>."""
    d = Dictionary()
    for i in range(50):
        d.add_symbol(f"w{i}")
    d.add_symbol("<mask>")
    return d


def _tokens(dictionary: Dictionary) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(4, len(dictionary), (3, MAX_POSITIONS), generator=generator)
    tokens[:, 0], tokens[1, 25:], tokens[2, 7:] = 0, 1, 1  # <s>, then padding in two rows
    return tokens


def _assert_same_features(fairseq_model: RobertaModel, encoder, tokens: torch.Tensor) -> None:
    real = tokens.ne(1)  # padding positions carry no meaning in either model
    with torch.no_grad():
        expected, _ = fairseq_model(tokens, features_only=True)
        got, _ = encoder(tokens, features_only=True)
        torch.testing.assert_close(got[real], expected[real], rtol=0, atol=1e-5)
        expected_logits, _ = fairseq_model(tokens)
        torch.testing.assert_close(encoder(tokens)[0][real], expected_logits[real], rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "prenorm, old_format", [(False, False), (True, False), (False, True)], ids=["post-LN", "pre-LN", "2019 names"]
)
def test_mapped_without_upcycling_the_features_equal_fairseqs_own_model(dictionary, tmp_path, prenorm, old_format):
    roberta = tiny_roberta(dictionary, prenorm=prenorm)
    source = save_like_fairseq(roberta, tmp_path / "roberta.pt", old_format=old_format)
    result = upcycle(str(source), str(tmp_path / "dense.pt"), {"moe_experts": 0})
    assert result.moe_layers == [] and result.source.kind == "fairseq roberta"
    encoder, enc_cfg, _ = load_encoder(str(tmp_path / "dense.pt"))
    assert (enc_cfg.encoder_normalize_before, enc_cfg.no_layernorm_embedding) == (prenorm, prenorm)
    assert enc_cfg.max_positions == MAX_POSITIONS  # fairseq's table has MAX_POSITIONS + padding_idx + 1 rows
    _assert_same_features(roberta, encoder, _tokens(dictionary))


def test_upcycled_with_the_gate_fixed_to_one_its_moe_layers_reproduce_the_dense_ffn(dictionary, tmp_path):
    roberta = tiny_roberta(dictionary)
    source = save_like_fairseq(roberta, tmp_path / "roberta.pt")
    result = upcycle(str(source), str(tmp_path / "moe.pt"), {"moe_experts": 4, "moe_layers": "0,2"})
    assert result.moe_layers == [0, 2]
    encoder, _, _ = load_encoder(str(tmp_path / "moe.pt"))
    fix_gates_to_one(encoder)
    tokens = _tokens(dictionary)
    with torch.no_grad():
        _, extra = encoder(tokens, features_only=True)
    assert all(aux.expert_index[tokens.ne(1)].unique().numel() > 1 for aux in extra["moe_aux"])  # experts differ by token
    _assert_same_features(roberta, encoder, tokens)


def _error_of(argv, capsys) -> str:
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("xmoe-upcycle: error:"), err
    return err


def test_what_cannot_be_mapped_is_refused_with_the_tensor_or_option_named(dictionary, tmp_path, capsys):
    with_head = tiny_roberta(dictionary)
    with_head.register_classification_head("xnli", num_classes=3)
    err = _error_of([save_like_fairseq(with_head, tmp_path / "head.pt"), tmp_path / "out.pt"], capsys)
    assert "cannot map tensor classification_heads.xnli.dense.bias (32,) to xmoe_encoder (4 unmapped" in err

    untied = tiny_roberta(dictionary, untie_weights_roberta=True)
    err = _error_of([save_like_fairseq(untied, tmp_path / "untied.pt"), tmp_path / "out.pt"], capsys)
    assert "encoder.lm_head.weight differs from the token embeddings" in err

    sinusoidal = tiny_roberta(dictionary, encoder_learned_pos=False)
    err = _error_of([save_like_fairseq(sinusoidal, tmp_path / "sinusoidal.pt"), tmp_path / "out.pt"], capsys)
    assert "no tensor encoder.sentence_encoder.embed_positions.weight: its positions are sinusoidal" in err

    tanh = tiny_roberta(dictionary, activation_fn="tanh")
    err = _error_of([save_like_fairseq(tanh, tmp_path / "tanh.pt"), tmp_path / "out.pt"], capsys)
    assert "activation_fn 'tanh' has no counterpart" in err
    assert not (tmp_path / "out.pt").exists()


@pytest.mark.slow
def test_a_corpus_binarized_with_the_dense_models_dictionary_trains_the_upcycled_model(upcycle_cli, cli, tmp_path):
    # The dense model's sentencepiece model and dictionary (XLM-R's sentencepiece.bpe.model and
    # dict.txt in real life) ...
    raw = write_raw_corpus(tmp_path / "raw")
    made = run_script("train_spm.py", "--raw", raw, "--out", tmp_path / "dense_spm", "--vocab-size", "200",
                      "--sentences-per-language", "100", "--threads", "1")
    assert made.returncode == 0, made.stderr
    dictionary = Dictionary.load(str(tmp_path / "dense_spm" / "dict.txt"))
    dictionary.add_symbol("<mask>")
    source = save_like_fairseq(tiny_roberta(dictionary), tmp_path / "roberta.pt")
    # ... given to data-prep, which checks the pair and binarizes with it.
    checked = run_script("train_spm.py", "--spm-model", tmp_path / "dense_spm" / "spm.model",
                         "--dict", tmp_path / "dense_spm" / "dict.txt", "--out", tmp_path / "spm")
    assert checked.returncode == 0, checked.stderr
    binarized = run_script("binarize.py", "--raw", raw, "--spm-model", tmp_path / "spm" / "spm.model",
                           "--dict", tmp_path / "spm" / "dict.txt", "--out", tmp_path / "data", "--workers", "1")
    assert binarized.returncode == 0, binarized.stderr

    out = tmp_path / "upcycled.pt"
    upcycled = upcycle_cli(source, out, "--moe-experts", "4", "--moe-freq", "2", "--expert-noise", "0.01",
                           "--data", tmp_path / "data", "--max-sentences", "32")
    cli.ok(upcycled)
    # the update-0 report on the cross-lingual task's validation batches (MLM and TLM)
    report = upcycled.output[upcycled.output.index("MLM loss at update 0"):]
    assert "dense model" in report and "upcycled, renormalized gates, no capacity limit" in report, upcycled.output
    # The printed command, as printed: the sizes and options the checkpoint needs, then ours.
    printed = next(line.strip() for line in upcycled.output.splitlines() if line.strip().startswith("fairseq-train"))
    command = shlex.split(printed.replace(" ...", ""))
    assert command[:2] == ["fairseq-train", "DATA"] and "--encoder-layers" in command, printed
    command = [cli.bin / "fairseq-train", tmp_path / "data", *command[2:]]
    command += ["--tokens-per-sample", str(MAX_POSITIONS), "--batch-size", "8", "--num-workers", "0", "--cpu",
                "--optimizer", "adam", "--lr", "0.001", "--max-update", "3", "--disable-validation",
                "--save-dir", tmp_path / "ckpt", "--log-format", "json", "--log-interval", "1"]
    run = cli.run(command, timeout=240)
    cli.ok(run)
    assert f"Loaded checkpoint {out} (epoch 1 @ 0 updates)" in run.output
    assert len(losses(run)) == 3 and all(loss == loss for loss in losses(run))  # three updates, no NaN
