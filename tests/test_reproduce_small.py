"""The reproduction study's --quick mode: the study's code path end to end on a toy corpus."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quick_reproduction_trains_analyses_and_reports_every_model(tmp_path):
    out = tmp_path / "study"
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "reproduce_small.py"), "--quick", "--out", str(out)],
        capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    study = json.loads((out / "results.json").read_text())
    assert [run["model"] for run in study["runs"]] == ["dense", "switch", "xmoe"]
    for run in study["runs"]:
        assert math.isfinite(run["valid_ppl"]) and run["valid_ppl"] > 1
        assert set(run["valid_ppl_by_group"]) == {"en", "de", "fr", "en-de", "en-fr"}
        assert 0 <= run["retrieval_avg"] <= 1
        assert run["wps"] > 0
        assert run["seconds"]["train"] > 0 and run["seconds"]["analysis"] > 0
        if run["model"] != "dense":
            assert [update for update, _ in run["rf_curve"]] == [20]  # RF between the checkpoints at 10 and 20
            assert 0 <= run["rf_final"] <= 1
            assert [update for update, _ in run["rc_curve"]] == [10, 20]
            assert run["load_max"] >= 1  # max expert share x E is 1 only when perfectly balanced
    report = (out / "results.md").read_text()
    for model in ("dense", "switch", "xmoe"):
        assert f"| {model} |" in report
    assert "## Plain reading" in report
    assert "the 3 runs took " in report
    assert (out / "results_plots" / "rf.png").stat().st_size > 1000
    # A second run reuses the finished runs instead of training again.
    again = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "reproduce_small.py"), "--quick", "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert again.returncode == 0 and again.stdout.count("reusing") == 3


@pytest.mark.parametrize("argv, message", [
    (["--seeds", "1,x"], "--seeds: expected a comma list of whole numbers, e.g. 1,2; got '1,x'"),
    (["--models", "dense,moe"], "--models: unknown ['moe']"),
    (["--updates", "300", "--checkpoint-every", "200"], "--updates must allow at least two checkpoints"),
])
def test_bad_options_stop_with_a_message_naming_the_option(script, capsys, argv, message):
    with pytest.raises(SystemExit) as stopped:
        script("reproduce_small").parse_args(argv)
    assert stopped.value.code == 2
    assert message in capsys.readouterr().err
