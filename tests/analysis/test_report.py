"""The reproduction report's account of where the study's time went."""

from xmoe.analysis.report import _time_spent


def test_time_spent_sums_the_runs_own_seconds_even_when_reused():
    study = {
        "wall_seconds": 2.0,
        "runs": [
            {"seconds": {"train": 100.0, "analysis": 10.5}},
            {"seconds": {"train": 50.0, "analysis": 4.5}},
        ],
    }
    text = _time_spent(study)
    assert text.startswith("the 2 runs took 165 s (150 s training, 15 s analysis); this invocation 2.0 s")


def test_time_spent_without_timed_runs_reports_only_this_invocation():
    text = _time_spent({"wall_seconds": 7.5, "runs": [{"model": "dense"}]})
    assert text == "this invocation 7.5 s (runs finished earlier with the same settings are reused)"
