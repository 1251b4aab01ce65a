"""xmoe-finetune: train on English TSV, evaluate zero-shot per language, reproducibly; bad
TSV lines are named by file and line."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from xmoe.finetune import FinetuneError, main, read_tsv

from data_prep.dataprep_helpers import LANGS, make_sentence


def write_pair_tsv(path: Path, lang: str, count: int, seed: int, header: bool = True) -> Path:
    """label 'same' when text_b repeats text_a, 'different' otherwise."""
    rng = random.Random(seed)
    lines = ["label\ttext_a\ttext_b"] if header else []
    for _ in range(count):
        text_a = make_sentence(lang, rng)
        same = rng.random() < 0.5
        lines.append(f"{'same' if same else 'different'}\t{text_a}\t{text_a if same else make_sentence(lang, rng)}")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tsv_files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tsv")
    files = {f"{lang}.test": write_pair_tsv(root / f"{lang}.test.tsv", lang, 24, seed=i) for i, lang in enumerate(LANGS)}
    files["en.train"] = write_pair_tsv(root / "en.train.tsv", "en", 48, seed=10, header=False)
    files["en.dev"] = write_pair_tsv(root / "en.dev.tsv", "en", 16, seed=11)
    return files


def finetune_args(pretrained, tsv_files, out: Path, *extra: str) -> list[str]:
    return [str(pretrained.exported), "--train", str(tsv_files["en.train"]), "--valid", str(tsv_files["en.dev"]),
            *[f"--eval={lang}={tsv_files[f'{lang}.test']}" for lang in LANGS],
            "--output-dir", str(out), "--epochs", "2", "--batch-size", "16", "--lr", "1e-3", "--seed", "3",
            "--log-interval", "1", *extra]


@pytest.mark.slow
@pytest.mark.usefixtures("one_torch_thread")
def test_recipe_writes_per_language_accuracy_best_model_and_tensorboard(pretrained, tsv_files, tmp_path, capsys):
    assert main(finetune_args(pretrained, tsv_files, tmp_path / "run")) == 0
    output = capsys.readouterr().out
    assert "epoch 1/2 step 1/3: loss" in output and "de: accuracy" in output

    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert set(metrics["accuracy"]) == set(LANGS)
    for lang in LANGS:
        assert 0.0 <= metrics["accuracy"][lang] <= 1.0
        assert metrics["eval"][lang]["examples"] == 24
        assert len(metrics["eval"][lang]["expert_load"]) == 2  # per MoE layer
    zero_shot = [metrics["accuracy"][lang] for lang in ("de", "zh-cn")]
    assert metrics["zero_shot_average"] == pytest.approx(sum(zero_shot) / 2)
    assert metrics["labels"] == ["different", "same"]
    assert [e["epoch"] for e in metrics["epochs"]] == [1, 2] and metrics["best_epoch"] in (1, 2)
    assert all("valid_accuracy" in e and e["train_balance_loss"] > 0 for e in metrics["epochs"])
    assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))

    # The default (--freeze-experts, the paper's setting): routers and experts leave unchanged.
    best = load_file(str(tmp_path / "run" / "best" / "model.safetensors"))
    exported = load_file(str(pretrained.exported / "model.safetensors"))
    moe_keys = [k for k in exported if ".ffn.router." in k or ".ffn.experts." in k]
    assert moe_keys and all(torch.equal(best[k], exported[k]) for k in moe_keys)
    assert not torch.equal(best["encoder.layers.0.self_attn.qkv_proj.weight"],
                           exported["encoder.layers.0.self_attn.qkv_proj.weight"])
    assert (tmp_path / "run" / "best" / "head_config.json").is_file()


@pytest.mark.slow
@pytest.mark.usefixtures("one_torch_thread")
def test_same_seed_same_run(pretrained, tsv_files, tmp_path):
    for name in ("a", "b"):
        args = [str(pretrained.exported), "--train", str(tsv_files["en.train"]), "--output-dir", str(tmp_path / name),
                "--epochs", "1", "--batch-size", "16", "--lr", "1e-3", "--seed", "3", "--no-tensorboard",
                f"--eval=de={tsv_files['de.test']}"]
        assert main(args) == 0
    first, second = (json.loads((tmp_path / n / "metrics.json").read_text()) for n in ("a", "b"))
    assert first["epochs"] == second["epochs"] and first["accuracy"] == second["accuracy"]
    a, b = (load_file(str(tmp_path / n / "best" / "head.safetensors")) for n in ("a", "b"))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    "content, message",
    [
        ("same\tone\ttwo\ndifferent\tonly one column\n", r"bad.tsv:2: 2 columns, but the file's first row has 3"),
        ("label\ttext_a\ttext_b\nsame\ta\tb\nsame\n", r"bad.tsv:3: expected 2 or 3 tab-separated columns"),
        ("same\ta\tb\n\tc\td\n", r"bad.tsv:2: empty label"),
        ("same\ta\tb\nsame\ta\t \n", r"bad.tsv:2: empty text in column 3"),
        ("same\ta\tb\tc\td\n", r"bad.tsv:1: expected 2 or 3 tab-separated columns .* got 5"),
        ("label\ttext_a\n", r"bad.tsv: no examples"),
    ],
)
def test_bad_rows_are_named_by_file_and_line(tmp_path, content, message):
    path = tmp_path / "bad.tsv"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(FinetuneError, match=message):
        read_tsv(str(path))


def test_header_and_blank_lines_are_skipped(tmp_path):
    path = tmp_path / "ok.tsv"
    path.write_text("\ufefflabel\ttext_a\ttext_b\r\nsame\ta\tb\r\n\nsame\tc\td\n", encoding="utf-8")
    examples = read_tsv(str(path))
    assert [(e.label, e.text_a, e.text_b, e.where.rsplit(":", 1)[1]) for e in examples] == [
        ("same", "a", "b", "2"), ("same", "c", "d", "4")
    ]


def test_not_utf8_is_named(tmp_path):
    path = tmp_path / "latin1.tsv"
    path.write_bytes("same\tcaf\u00e9\tb\n".encode("latin-1"))
    with pytest.raises(FinetuneError, match=r"latin1.tsv:1: not UTF-8"):
        read_tsv(str(path))


@pytest.mark.slow
def test_cli_reports_bad_input_with_exit_2(pretrained, tsv_files, tmp_path, capsys):
    bad = tmp_path / "de.tsv"
    bad.write_text("same\ta\tb\nmaybe\tc\td\n", encoding="utf-8")
    args = finetune_args(pretrained, tsv_files, tmp_path / "run") + [f"--eval=de={bad}"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"{bad}:2: label 'maybe' is not among the training labels ['different', 'same']" in err
    assert not (tmp_path / "run").exists()  # nothing written before the inputs are checked

    args = finetune_args(pretrained, tsv_files, tmp_path / "run") + [f"--eval=xx={tsv_files['de.test']}"]
    assert main(args) == 2
    assert "unknown language 'xx'; the model knows ['en', 'de', 'zh-cn']" in capsys.readouterr().err
