"""The reproduction study's --quick mode: the study's code path end to end on a toy corpus."""

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quick_reproduction_trains_analyses_reports_and_reuses_the_runs_files(tmp_path):
    out = tmp_path / "study"
    models = ["--models", "dense,xmoe,xmoe_upcycled,dense_restarted"]
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "reproduce_small.py"), "--quick", "--out", str(out), *models],
        capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    study = json.loads((out / "results.json").read_text())
    assert [run["model"] for run in study["runs"]] == ["dense", "xmoe", "xmoe_upcycled", "dense_restarted"]
    assert study["missing"] == []
    for run in study["runs"]:
        assert math.isfinite(run["valid_ppl"]) and run["valid_ppl"] > 1
        assert set(run["valid_ppl_by_group"]) == {"en", "de", "fr", "en-de", "en-fr"}
        assert 0 <= run["retrieval_avg"] <= 1
        retrieval = run["retrieval"]
        assert retrieval["centring"] == "language"
        for encoder in ("model", "random_init", "tfidf"):  # the model beside both baselines, per pair
            assert set(retrieval[encoder]) == {"en-de", "en-fr"}
            assert all(0 <= v <= 1 for v in retrieval[encoder].values())
        assert retrieval["model"] == run["retrieval_by_pair"]
        assert "topic" not in run  # the toy corpus has no topic task
        assert run["wps"] > 0
        assert run["seconds"]["train"] > 0 and run["seconds"]["analysis"] > 0
        if run["model"] not in ("dense", "dense_restarted"):
            # RF between the checkpoints at 4 and 8 (the upcycled model's: 6 and 8, counted from
            # the dense run's start; it saves every 2 updates of its 4)
            assert [update for update, _ in run["rf_curve"]] == [8]
            assert 0 <= run["rf_final"] <= 1
            assert [update for update, _ in run["rc_curve"]] == ([6, 8] if run["model"] == "xmoe_upcycled" else [4, 8])
            assert run["load_max"] >= 1  # max expert share x E is 1 only when perfectly balanced
    upcycled, restarted = study["runs"][2:]
    for run in (upcycled, restarted):  # both start from the dense run's own checkpoint at half way
        assert run["upcycled_from"]["at_update"] == 4
        assert run["upcycled_from"]["dense_checkpoint"].endswith("dense-seed1/checkpoints/checkpoint_1_4.pt")
        # the second half trains on the batches after the dense run's first 4, not on those again
        log = (out / "runs" / f"{run['model']}-seed1" / "train.log").read_text()
        assert "epoch 1 resumes after 32 of its samples" in log and "at global batch 4" in log
    loss = upcycled["upcycled_from"]["mlm_loss_at_update0"]
    assert loss["renormalized_dropless"] == loss["dense"]  # identical experts, gates summing to 1: the dense function
    assert "rf_curve" not in restarted and "mlm_loss_at_update0" not in restarted["upcycled_from"]
    files = sorted(path.name for path in (out / "results_runs").iterdir())
    assert [name.rsplit("-", 1)[0] for name in files] == [
        "dense-seed1", "dense_restarted-seed1", "xmoe-seed1", "xmoe_upcycled-seed1"]
    report = (out / "results.md").read_text()
    for row in ("| dense |", "| xmoe |", "| xmoe at random init |", "| TF-IDF |"):
        assert row in report
    assert "## Plain reading" in report and "the 4 runs took " in report
    assert "## Does upcycling pay?" in report and "| 1 | xmoe_upcycled |" in report and "| 1 | dense_restarted |" in report
    for plot in ("rf.png", "retrieval.png"):  # RF curves; retrieval per pair beside the baselines
        assert (out / "results_plots" / plot).stat().st_size > 1000

    # On another machine only the runs' files are left (no checkpoints); text written by hand
    # below the marker survives the regeneration; a seed never run is listed as missing.
    shutil.rmtree(out / "runs")
    from xmoe.analysis.report import KEPT_MARKER
    (out / "results.md").write_text(report + "\n" + KEPT_MARKER + "\n\n## Findings\nkept text\n")
    again = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "reproduce_small.py"), "--quick", "--out", str(out),
         "--report-only", "--seeds", "1,2", *models],
        capture_output=True, text=True, timeout=300,
    )
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert again.stdout.count("reusing") == 4 and "training" not in again.stdout
    missing = "dense seed 2, xmoe seed 2, xmoe_upcycled seed 2, dense_restarted seed 2"
    assert f"missing runs: {missing}" in again.stdout
    regenerated = (out / "results.md").read_text()
    assert f"**missing: {missing}**" in regenerated
    assert regenerated.endswith(KEPT_MARKER + "\n\n## Findings\nkept text\n")
    assert regenerated.count(KEPT_MARKER) == 1


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
