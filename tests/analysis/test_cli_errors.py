"""Bad inputs to xmoe-analyze end with one clear line on stderr and exit code 2, no traceback."""

import json
import shutil
import sys

import pytest

from xmoe.analysis.cli import main

from .conftest import make_corpus


def fails_with(capsys, argv, *expected: str) -> str:
    with pytest.raises(SystemExit) as stop:
        main([str(a) for a in argv])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    for text in expected:
        assert text in err, err
    return err


def test_missing_checkpoint_is_named_before_any_work(capsys, analysis_corpus, tmp_path):
    fails_with(capsys, ["rf", tmp_path / "a.pt", tmp_path / "b.pt", "--data", analysis_corpus, "--out", tmp_path],
               f"checkpoint {tmp_path / 'a.pt'} does not exist")


def test_missing_or_foreign_data_folder(capsys, tmp_path):
    (tmp_path / "ckpt.pt").write_bytes(b"")
    fails_with(capsys, ["load", tmp_path / "ckpt.pt", "--data", tmp_path / "nowhere", "--out", tmp_path],
               "data folder", "does not exist")
    (tmp_path / "empty").mkdir()
    fails_with(capsys, ["load", tmp_path / "ckpt.pt", "--data", tmp_path / "empty", "--out", tmp_path],
               "neither manifest.json", "nor dict.txt")


def test_a_file_that_is_no_checkpoint(capsys, analysis_corpus, tmp_path):
    (tmp_path / "notes.pt").write_text("not a checkpoint")
    fails_with(capsys, ["load", tmp_path / "notes.pt", "--data", analysis_corpus, "--out", tmp_path],
               f"cannot load {tmp_path / 'notes.pt'} as an xmoe_encoder checkpoint")


def test_one_checkpoint_is_not_enough_for_routing_fluctuation(capsys, analysis_corpus, tmp_path):
    fails_with(capsys, ["rf", tmp_path / "a.pt", "--data", analysis_corpus, "--out", tmp_path], "at least two")


def test_consistency_refuses_incomparable_load_files(capsys, tmp_path):
    def load_json(name, groups):
        path = tmp_path / name
        layer = {"load": [[0.5, 0.5]] * len(groups), "overall": [0.5, 0.5]}
        path.write_text(json.dumps({"command": "load", "moe_layers": [1], "num_experts": 2, "groups": groups,
                                    "layers": {"1": layer}}))
        return path

    a, b = load_json("a.json", ["en"]), load_json("b.json", ["en", "de"])
    fails_with(capsys, ["consistency", a, b, "--out", tmp_path], "runs are not comparable: groups")
    (tmp_path / "c.json").write_text(json.dumps({"command": "rf"}))
    fails_with(capsys, ["consistency", a, tmp_path / "c.json", "--out", tmp_path], "is not the load.json")


@pytest.mark.slow
class TestWithTrainedModel:
    def test_non_xmoe_checkpoint(self, capsys, foreign_checkpoint, analysis_corpus, tmp_path):
        fails_with(capsys, ["rc", foreign_checkpoint, "--data", analysis_corpus, "--out", tmp_path],
                   "not an xmoe_encoder model", "roberta_base")

    def test_dense_checkpoint_has_no_routing_to_analyse(self, capsys, trained_run, dense_checkpoint,
                                                        analysis_corpus, tmp_path):
        fails_with(capsys, ["rf", trained_run.last, dense_checkpoint, "--data", analysis_corpus, "--out", tmp_path],
                   f"checkpoint {dense_checkpoint} is a dense model (no MoE layer)")

    def test_corpus_with_another_vocabulary_size(self, capsys, trained_run, tmp_path):
        other = make_corpus(tmp_path / "other", extra_symbols=3)
        fails_with(capsys, ["load", trained_run.last, "--data", other, "--out", tmp_path],
                   "dictionary mismatch", "vocabulary of 53 tokens", "has 56")

    def test_corpus_with_another_dictionary_of_the_same_size(self, capsys, trained_run, analysis_corpus, tmp_path):
        other = shutil.copytree(analysis_corpus, tmp_path / "renamed")
        dictionary = other / "dict.txt"
        dictionary.write_text(dictionary.read_text().replace("\u2581t1 ", "\u2581s1 "))
        fails_with(capsys, ["retrieval", trained_run.last, "--data", other, "--out", tmp_path],
                   "dictionary mismatch", "was trained with", "differs from")

    def test_unknown_language_and_layer(self, capsys, trained_run, analysis_corpus, tmp_path):
        fails_with(capsys, ["load", trained_run.last, "--data", analysis_corpus, "--out", tmp_path, "--langs", "en,xx"],
                   "--langs: unknown language 'xx'", "en, de, fr")
        fails_with(capsys, ["retrieval", trained_run.last, "--data", analysis_corpus, "--out", tmp_path,
                            "--layer", "5"], "--layer 5 out of range: 0 (embeddings) .. 4")

    def test_console_entry_point_exits_with_2_and_no_traceback(self, cli, foreign_checkpoint, analysis_corpus, tmp_path):
        run = cli.run([sys.executable, "-m", "xmoe.analysis.cli", "load", foreign_checkpoint,
                       "--data", analysis_corpus, "--out", tmp_path], timeout=120)
        assert run.returncode == 2, run.output
        assert "Traceback" not in run.output
        assert run.output.strip().splitlines()[-1].startswith("xmoe-analyze load: error: cannot load")
