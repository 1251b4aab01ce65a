"""The reproduction report: where the study's time went, and the upcycling comparison."""

from xmoe.analysis.report import _time_spent, _upcycling_section


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


def _run(model, seed, ppl, retrieval, topic_de, rf=None, rc=None, baselines=False):
    random_init = 0.1 if seed == 1 else 0.12
    run = {
        "model": model, "seed": seed, "valid_ppl": ppl, "valid_ppl_by_group": {}, "retrieval_avg": retrieval,
        "wps": 1.0, "retrieval": {"model": {"en-de": retrieval}, "random_init": {"en-de": random_init}, "tfidf": {"en-de": 0.4}},
        "topic": {"model": {"en": 0.6, "de": topic_de, "fr": topic_de + 0.1}}, "run_settings": {},
    }
    if baselines:
        run["topic"].update({"random_init": {"en": 0.5, "de": 0.3, "fr": 0.3}, "tfidf": {"en": 0.7, "de": 0.4, "fr": 0.2},
                             "majority": {"en": 0.33, "de": 0.32, "fr": 0.34}})
    if rf is not None:
        run.update(rf_final=rf, rf_curve=[(1200, rf + 0.1), (1500, rf)], rc_final=rc)
    if model == "xmoe_upcycled":
        run["run_settings"]["upcycle"] = {"at_update": 750, "updates": 750, "warmup": 75, "lr": 0.001, "expert_noise": 0.0}
        run["upcycled_from"] = {"mlm_loss_at_update0": {"dense": 8.7431, "upcycled": 8.7562, "renormalized_dropless": 8.7431}}
    return run


def test_upcycling_section_sets_the_upcycled_model_beside_its_parents_per_seed_and_mean():
    runs = [
        _run("dense", 1, 390.0, 0.20, 0.30, baselines=True), _run("dense", 2, 400.0, 0.22, 0.32),
        _run("xmoe", 1, 396.0, 0.16, 0.20, rf=0.17, rc=48.0, baselines=True), _run("xmoe", 2, 408.0, 0.14, 0.22, rf=0.19, rc=48.4),
        _run("xmoe", 3, 406.0, 0.15, 0.21, rf=0.18, rc=47.0),  # no upcycled run of seed 3: left out
        _run("xmoe_upcycled", 1, 380.0, 0.21, 0.25, rf=0.10, rc=40.0, baselines=True),
        _run("xmoe_upcycled", 2, 384.0, 0.19, 0.27, rf=0.12, rc=42.0),
        _run("dense_restarted", 1, 385.0, 0.19, 0.28),  # the control, run for seed 1 only
    ]
    grouped = {}
    for run in runs:
        grouped.setdefault(run["model"], []).append(run)
    text = "\n".join(_upcycling_section(grouped, {"updates": 1500, "checkpoint_every": 300, "lr": 0.001}))
    assert "at update 750 of 1500" in text and "75 warm-up updates to lr 0.001" in text
    assert "RF is over the last 300 updates for every model." in text
    # seed, model, ppl, retrieval %, zero-shot topic % (mean of de and fr), en %, RF, RC
    assert "| 1 | xmoe_upcycled | 380.0 | 21.0 | 30.0 | 60.0 | 0.100 | 40.0 |" in text
    assert "| 2 | dense | 400.0 | 22.0 | 37.0 | 60.0 | – | – |" in text
    assert "| mean ± half-range | xmoe | 402.0 ± 6.0 | 15.0 ± 1.0 | 26.0 ± 1.0 | 60.0 ± 0.0 | 0.180 ± 0.010 | 48.2 ± 0.2 |" in text
    assert "| 3 |" not in text
    assert "| 1 | dense_restarted | 385.0 | 19.0 | 33.0 | 60.0 | – | – |" in text and "| 2 | dense_restarted |" not in text
    assert "- vs dense_restarted, validation perplexity: xmoe_upcycled 382 vs dense_restarted 385: better" in text
    assert "better in 1 of 1 seeds." in text.split("vs dense_restarted, validation perplexity")[1].splitlines()[0]
    assert "| baseline | xmoe at random init | – | 11.0 ± 1.0 | 30.0 | 50.0 | – | – |" in text  # seeds 1 and 2
    assert "| baseline | TF-IDF | – | 40.0 | 30.0 | 70.0 | – | – |" in text
    assert "seed 1: dense 8.743, upcycled 8.756 (renormalized gates, no capacity limit 8.743)" in text
    assert "- vs xmoe, validation perplexity: xmoe_upcycled 382 vs xmoe 402: better (beyond the seed spread); better in 2 of 2 seeds." in text
    assert "- vs dense, retrieval accuracy: xmoe_upcycled 0.2 vs dense 0.21: worse (within noise / unconfirmed); better in 1 of 2 seeds." in text
    assert "vs dense, routing fluctuation" not in text  # the dense model has no router


def test_upcycling_section_is_left_out_without_an_upcycled_run():
    assert _upcycling_section({"dense": [_run("dense", 1, 390.0, 0.2, 0.3)], "xmoe": [_run("xmoe", 1, 396.0, 0.16, 0.2)]},
                              {"updates": 1500, "checkpoint_every": 300, "lr": 0.001}) == []


def test_report_sets_the_topic_probe_beside_its_baselines_and_names_the_unprobed_runs(tmp_path):
    from xmoe.analysis.report import write_reproduction_report

    probe_baselines = {"random_init": {"en": 0.5, "de": 0.30, "fr": 0.28}, "tfidf": {"en": 0.75, "de": 0.44, "fr": 0.43},
                       "majority": {"en": 0.325, "de": 0.325, "fr": 0.324}}
    runs = [_run("dense", 1, 390.0, 0.20, 0.30, baselines=True), _run("xmoe", 1, 396.0, 0.16, 0.20, baselines=True),
            _run("xmoe", 2, 408.0, 0.14, 0.22)]
    runs[1].update(topic_probe={"model": {"en": 0.58, "de": 0.32, "fr": 0.39}, **probe_baselines}, topic_probe_layer=3)
    runs[2].update(topic_probe={"model": {"en": 0.56, "de": 0.27, "fr": 0.37}}, topic_probe_layer=3)
    study = {"runs": runs, "settings": {"updates": 1500, "checkpoint_every": 300, "lr": 0.001, "experts": 8,
                                        "routing_dim": 4, "batch_size": 32, "tokens_per_sample": 128, "seeds": "1,2"},
             "command": "scripts/reproduce_small.sh", "data": "data-bin", "topic_data": "topic", "hardware": "2 CPU cores",
             "wall_seconds": 1.0, "paper": {}, "missing": []}
    text = write_reproduction_report(study, tmp_path / "results.md", tmp_path / "plots").read_text()
    table = text.split("frozen encoder, per-language centred linear probe at layer 3")[1].split("\n\n")[1]
    assert "| encoder | en | de | fr | avg |" in table
    assert "| xmoe | 57.0 ± 1.0 | 29.5 ± 2.5 | 38.0 ± 1.0 | 41.5 ± 1.5 |" in table  # mean ± half-range of seeds 1, 2
    assert "| xmoe at random init | 50.0 | 30.0 | 28.0 | 36.0 |" in table
    assert "| TF-IDF + logistic regression | 75.0 | 44.0 | 43.0 | 54.0 |" in table
    assert "| dense |" not in table  # not probed: no row, but named below the table
    assert "Not probed (finished before the probe was part of the study" in text and ": dense seed 1." in text
    # de: 29.5 vs 30.0 is not a win; fr: 38.0 vs 28.0 is
    assert "- xmoe vs its own architecture at random init, topic languages (probe): beats it on 2 of 3 (not on de)." in text
