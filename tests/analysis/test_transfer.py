"""`xmoe-analyze transfer`: zero-shot topic accuracy per language beside its baselines, on a
topic task built by data-prep/build_topic_task.py from generated help pages, with a model whose
tokenizer data-prep trained on generated text in the same languages."""

import json
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from data_prep.dataprep_helpers import run_script, topic_help_pages, write_help_cache, write_raw_corpus
from xmoe.analysis.cli import main

pytestmark = pytest.mark.slow  # fine-tunes tiny encoders; the shared fixture trains with fairseq-train

LANGS = ["en", "de", "zh-cn"]
QUICK = ["--epochs", "2", "--max-length", "24", "--batch-size", "8", "--lr", "3e-3", "--device", "cpu"]


@pytest.fixture(scope="module")
def topic_task(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("topic")
    write_help_cache(root / "cache", topic_help_pages(pages_per_module=20))
    built = run_script("build_topic_task.py", "--offline", "--cache-dir", root / "cache", "--out", root / "topic",
                       "--langs", *LANGS, "--workers", "1")
    assert built.returncode == 0, built.stderr
    return root / "topic"


@pytest.fixture(scope="module")
def random_init_checkpoint(trained_run, tmp_path_factory) -> Path:
    """An xmoe_tiny checkpoint (the trained run's file and config) whose weights are the
    random-init baseline's own (seed 0), for a vocabulary data-prep trained on en/de/zh-cn text."""
    from xmoe.analysis.baselines import random_init_encoder
    from xmoe.checkpoint import load_checkpoint_file, load_encoder

    root = tmp_path_factory.mktemp("transfer_model")
    raw = write_raw_corpus(root / "raw")
    spm = run_script("train_spm.py", "--raw", raw, "--out", root / "spm", "--vocab-size", "300",
                     "--sentences-per-language", "200", "--threads", "1")
    assert spm.returncode == 0, spm.stderr
    data = root / "data"
    binarized = run_script("binarize.py", "--raw", raw, "--spm-model", root / "spm" / "spm.model",
                           "--dict", root / "spm" / "dict.txt", "--out", data, "--workers", "1")
    assert binarized.returncode == 0, binarized.stderr
    _, config, _ = load_encoder(str(trained_run.last))
    vocab_size = sum(1 for _ in open(data / "dict.txt", encoding="utf-8")) + 5  # 4 specials + <mask>
    weights = random_init_encoder(replace(config, vocab_size=vocab_size), seed=0).state_dict()
    state = load_checkpoint_file(str(trained_run.last))
    state["model"] = {f"encoder.{key}": value for key, value in weights.items()}
    state["cfg"]["task"]["data"] = str(data)
    path = root / "random_init_seed0.pt"
    torch.save(state, path)
    return path


@pytest.fixture(scope="module")
def dense_random_init_checkpoint(random_init_checkpoint, tmp_path_factory) -> Path:
    """random_init_checkpoint's vocabulary and data as a dense_tiny encoder (no MoE layer) whose
    weights are the random-init baseline's own (seed 0)."""
    from xmoe.analysis.baselines import random_init_encoder
    from xmoe.checkpoint import load_checkpoint_file, load_encoder

    _, config, _ = load_encoder(str(random_init_checkpoint))
    dense = replace(config, moe_layer_indices=[], moe_experts=0)
    state = load_checkpoint_file(str(random_init_checkpoint))
    state["cfg"]["model"].update({"_name": "dense_tiny", "moe_experts": 0, "moe_freq": 0, "moe_layers": ""})
    state["model"] = {f"encoder.{key}": value for key, value in random_init_encoder(dense, seed=0).state_dict().items()}
    path = tmp_path_factory.mktemp("dense_transfer_model") / "dense_random_init_seed0.pt"
    torch.save(state, path)
    return path


def read_labels(path: Path) -> list[str]:
    return [line.split("\t")[0] for line in path.read_text(encoding="utf-8").splitlines()[1:]]


def test_transfer_reports_every_language_beside_its_baselines(random_init_checkpoint, topic_task, tmp_path, capsys):
    out = tmp_path / "transfer"
    assert main(["transfer", str(random_init_checkpoint), "--topic-data", str(topic_task), "--out", str(out),
                 "--seeds", "1,2", "--max-train-per-class", "5", *QUICK]) == 0
    result = json.loads((out / "transfer.json").read_text())
    assert result["languages"] == LANGS and result["seeds"] == [1, 2] and result["unit"] == "page"
    assert sorted(result["results"]) == ["majority", "model", "random_init", "tfidf"]

    # The capped training set: the first 5 pages of each module, in the task's order.
    manifest = json.loads((topic_task / "manifest.json").read_text())
    train_labels = read_labels(topic_task / "en.train.tsv")
    kept = read_labels(out / "train.tsv")
    assert Counter(kept) == {label: min(5, n) for label, n in Counter(train_labels).items()}
    assert result["examples"] == {"train": len(kept), "dev": manifest["sizes"]["dev"], "test": manifest["sizes"]["test"]}

    # The model IS the random-init baseline (same config, seed 0): fine-tuned the same way with
    # the same seeds, it must score exactly the same, seed by seed.
    model, untrained = result["results"]["model"], result["results"]["random_init"]
    assert untrained["init_seed"] == 0 and model["by_seed"] == untrained["by_seed"]
    assert sorted(model["by_seed"]) == ["1", "2"]
    for lang in LANGS:
        runs = [model["by_seed"][seed][lang] for seed in ("1", "2")]
        assert model["accuracy"][lang] == pytest.approx(sum(runs) / 2)
        metrics = json.loads((out / "runs" / "model-seed1" / "metrics.json").read_text())
        assert metrics["accuracy"][lang] == model["by_seed"]["1"][lang]
    assert model["zero_shot_average"] == pytest.approx((model["accuracy"]["de"] + model["accuracy"]["zh-cn"]) / 2)

    # Majority class of the whole English training file, scored on every test file.
    majority = result["results"]["majority"]
    label = majority["label"]
    assert Counter(train_labels)[label] == max(Counter(train_labels).values())
    for lang in LANGS:
        test_labels = read_labels(topic_task / f"{lang}.test.tsv")
        assert majority["accuracy"][lang] == test_labels.count(label) / len(test_labels)
    # Each module has words of its own: a bag of English pieces separates them in English.
    assert result["results"]["tfidf"]["accuracy"]["en"] > 0.9 > majority["accuracy"]["en"]
    assert result["results"]["tfidf"]["C"] in (0.1, 1.0, 10.0, 100.0)

    table = capsys.readouterr().out
    assert "zero-shot topic accuracy" in table and "random init" in table and "TF-IDF+LR" in table
    de_row = next(line for line in table.splitlines() if line.startswith("de "))
    assert f"{100 * majority['accuracy']['de']:.1f}" in de_row.split()[-1]
    assert not (out / "runs" / "model-seed1" / "best").exists()  # fine-tuned weights are not kept


def test_a_dense_encoder_fine_tunes_and_equals_its_random_init_baseline(dense_random_init_checkpoint, topic_task,
                                                                       tmp_path):
    out = tmp_path / "transfer"
    assert main(["transfer", str(dense_random_init_checkpoint), "--topic-data", str(topic_task), "--out", str(out),
                 "--seeds", "1", "--max-train-per-class", "5", "--baselines", "random_init", *QUICK]) == 0
    result = json.loads((out / "transfer.json").read_text())
    model, untrained = result["results"]["model"], result["results"]["random_init"]
    assert model["by_seed"] == untrained["by_seed"] and sorted(model["by_seed"]["1"]) == sorted(LANGS)
    metrics = json.loads((out / "runs" / "model-seed1" / "metrics.json").read_text())
    assert metrics["accuracy"] == model["by_seed"]["1"]


def test_transfer_takes_an_exported_folder_and_a_test_subset(random_init_checkpoint, topic_task, tmp_path):
    from xmoe.export import export

    exported = export(str(random_init_checkpoint), str(tmp_path / "exported"), log=lambda *_: None)
    out = tmp_path / "transfer"
    assert main(["transfer", str(exported), "--topic-data", str(topic_task), "--out", str(out),
                 "--baselines", "majority", "--languages", "en,de", "--max-test-per-language", "7", *QUICK]) == 0
    result = json.loads((out / "transfer.json").read_text())
    assert sorted(result["results"]) == ["majority", "model"] and result["languages"] == ["en", "de"]
    assert result["examples"]["test"] == {"en": 7, "de": 7}
    assert read_labels(out / "de.test.tsv") == read_labels(topic_task / "de.test.tsv")[:7]
    assert result["model"] == {"path": str(exported)}


@pytest.mark.parametrize("options, message", [
    (["--topic-data", "{missing}"], "no manifest.json (build the task with data-prep/build_topic_task.py)"),
    (["--languages", "en,fr"], "--languages: no test data for fr"),
])
def test_transfer_bad_input_is_one_line_and_exit_2(random_init_checkpoint, topic_task, tmp_path, capsys, options, message):
    options = [o.replace("{missing}", str(tmp_path / "nowhere")) for o in options]
    arguments = ["transfer", str(random_init_checkpoint), "--out", str(tmp_path / "out"), *QUICK]
    if "--topic-data" not in options:
        arguments += ["--topic-data", str(topic_task)]
    with pytest.raises(SystemExit) as exit_info:
        main(arguments + options)
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert message in error and "Traceback" not in error


def test_probe_of_the_random_init_weights_is_the_random_init_baseline(random_init_checkpoint, topic_task, tmp_path,
                                                                      capsys):
    out = tmp_path / "probe"
    assert main(["transfer", str(random_init_checkpoint), "--topic-data", str(topic_task), "--out", str(out),
                 "--method", "probe", "--layer", "1", "--seeds", "1,2", "--baselines", "random_init,majority",
                 "--max-length", "24", "--device", "cpu"]) == 0
    result = json.loads((out / "transfer.json").read_text())
    assert (result["method"], result["layer"], result["centring"]) == ("probe", 1, "language")
    model, untrained = result["results"]["model"], result["results"]["random_init"]
    # The same weights through the same frozen probe: exactly the same accuracies, seed by seed.
    assert model["by_seed"] == untrained["by_seed"] and model["C"] == untrained["C"]
    assert sorted(model["by_seed"]) == ["1", "2"] and set(model["accuracy"]) == set(LANGS)
    assert all(0.0 <= value <= 1.0 for value in model["accuracy"].values())
    assert not (out / "runs").exists()  # nothing fine-tuned
    # The probe costs seconds, so by default it trains on every English train page (no per-module cap).
    assert result["examples"]["train"] == len(read_labels(topic_task / "en.train.tsv")) > 0
    assert result["settings"]["max_train_per_class"] is None
    assert "frozen layer-1 probe (language centring)" in capsys.readouterr().out


def test_probe_layer_outside_the_model_is_one_line(random_init_checkpoint, topic_task, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["transfer", str(random_init_checkpoint), "--topic-data", str(topic_task), "--out",
              str(tmp_path / "t"), "--method", "probe", "--layer", "99", "--baselines", "none"])
    assert exit_info.value.code == 2
    assert "--layer 99: the model has layers 0..4" in capsys.readouterr().err
