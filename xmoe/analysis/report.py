"""The reproduction study's report (docs/results.md), written only from measured numbers.

`study` is what scripts/reproduce_small.py collects: settings, hardware, the paper's reference
numbers, and one summary per (model, seed) run with validation perplexity, routing fluctuation
(RF) and representation collapse (RC) curves, expert-load balance, retrieval accuracy and wps.
The "plain reading" compares means and says a difference is clear only when it exceeds the
spread over seeds; with one seed every difference is reported as unconfirmed.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any, Optional

# The report is regenerated from the runs; what follows this line in the existing file (the
# findings behind the recipe, written by hand) is carried over unchanged.
KEPT_MARKER = "<!-- Everything below this line is written by hand; the report generator keeps it. -->"

MOE_PAIRS = [("switch", "xmoe", "softmax gate"), ("switch_sigmoid", "xmoe_sigmoid", "sigmoid gate")]
# X-MoE upcycled from the dense run at half way (scripts/reproduce_small.py), beside both its parents.
UPCYCLED, UPCYCLING_REFERENCES = "xmoe_upcycled", ("dense", "xmoe")
# its control: the dense run restarted at half way as the upcycled one is, without experts
RESTARTED = "dense_restarted"


def _finite(values: list) -> list[float]:
    return [float(v) for v in values if v is not None and math.isfinite(float(v))]


def mean_spread(values: list) -> tuple[float, float]:
    """(mean, half the max-min range) over seeds; nan when there is nothing to average."""
    finite = _finite(values)
    if not finite:
        return math.nan, math.nan
    return statistics.fmean(finite), (max(finite) - min(finite)) / 2


def _cell(values: list, digits: int = 3) -> str:
    mean, spread = mean_spread(values)
    if math.isnan(mean):
        return "–"
    return f"{mean:.{digits}f} ± {spread:.{digits}f}" if len(_finite(values)) > 1 else f"{mean:.{digits}f}"


def _by_model(runs: list[dict]) -> dict[str, list[dict]]:
    grouped: dict[str, list[dict]] = {}
    for run in runs:
        grouped.setdefault(run["model"], []).append(run)
    return grouped


# metric -> (its name in the plain reading, whether higher is better)
COMPARED_METRICS = {
    "valid_ppl": ("validation perplexity", False),
    "retrieval_avg": ("retrieval accuracy", True),
    "zero_shot_topic": ("zero-shot topic accuracy", True),
    "rf_final": ("routing fluctuation", False),
    "rc_final": ("representation collapse measure (higher = less collapsed)", True),
}


def _metrics(*names: str) -> list[tuple[str, str, bool]]:
    return [(name, *COMPARED_METRICS[name]) for name in names]


def _compare(grouped, metric: str, baseline: str, candidate: str, higher_is_better: bool) -> Optional[str]:
    if baseline not in grouped or candidate not in grouped:
        return None
    base_mean, base_spread = mean_spread([r.get(metric) for r in grouped[baseline]])
    cand_mean, cand_spread = mean_spread([r.get(metric) for r in grouped[candidate]])
    if math.isnan(base_mean) or math.isnan(cand_mean):
        return None
    better = cand_mean > base_mean if higher_is_better else cand_mean < base_mean
    seeds = min(len(grouped[baseline]), len(grouped[candidate]))
    clear = seeds > 1 and abs(cand_mean - base_mean) > base_spread + cand_spread
    verdict = ("better" if better else "worse") + (" (beyond the seed spread)" if clear else " (within noise / unconfirmed)")
    return f"{candidate} {cand_mean:.4g} vs {baseline} {base_mean:.4g}: {verdict}"


def _mean_curve(runs: list[dict], key: str) -> tuple[list[float], list[float]]:
    curves = [run[key] for run in runs if run.get(key)]
    if not curves:
        return [], []
    length = min(len(c) for c in curves)
    xs = [curves[0][i][0] for i in range(length)]
    ys = [statistics.fmean(_finite([c[i][1] for c in curves]) or [math.nan]) for i in range(length)]
    return xs, ys


def _time_spent(study: dict) -> str:
    """Wall time of the study: the runs' own train + analysis seconds (also for reused runs)."""
    timed = [run["seconds"] for run in study["runs"] if "seconds" in run]
    spent = f"this invocation {study['wall_seconds']} s (runs finished earlier with the same settings are reused)"
    if timed:
        train = sum(t["train"] for t in timed)
        analysis = sum(t["analysis"] for t in timed)
        spent = (f"the {len(timed)} runs took {train + analysis:.0f} s ({train:.0f} s training, "
                 f"{analysis:.0f} s analysis); " + spent)
    return spent


def _per_key_table(title: str, rows: list[tuple[str, list[dict], str]], keys: list[str]) -> list[str]:
    """A table with one row per (label, runs, field) and one column per key (pair or language):
    mean ± half-range over the runs of 100 x run[field][key], and of each run's average."""
    lines = ["", title, "", "| encoder | " + " | ".join(keys) + " | avg |", "|---|" + "---|" * (len(keys) + 1)]
    for label, runs, field in rows:
        cells, averages = [], []
        for key in keys:
            values = [_nested(run, field, key) for run in runs]
            values = [100 * v if v is not None else v for v in values]
            cells.append(_cell(values, 1))
        for run in runs:
            found = _finite([_nested(run, field, key) for key in keys])
            if len(found) == len(keys):
                averages.append(100 * statistics.fmean(found))
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {_cell(averages, 1)} |")
    return lines


def _topic_rows(field: str, runs_by_model: dict[str, list[dict]], models: list[str],
                all_runs: list[dict]) -> list[tuple[str, list[dict], str]]:
    """_per_key_table rows of a topic-accuracy field ("topic" or "topic_probe"): each model, each
    model's random init, then TF-IDF and the majority class from the first run that has them."""
    rows = [(model, runs_by_model[model], f"{field}.model") for model in models]
    rows += [(f"{model} at random init", runs_by_model[model], f"{field}.random_init") for model in models]
    with_baselines = [run for run in all_runs if "tfidf" in (run.get(field) or {})][:1]
    return rows + [("TF-IDF + logistic regression", with_baselines, f"{field}.tfidf"),
                   ("majority class", with_baselines, f"{field}.majority")]


def _nested(run: dict, field: str, key: str) -> Optional[float]:
    """run['retrieval']['model']['en-de'] for field 'retrieval.model' and key 'en-de'."""
    value: Any = run
    for part in field.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    value = value.get(key) if isinstance(value, dict) else None
    return float(value) if value is not None else None


def _beats(runs: list[dict], field: str, baseline_runs: list[dict], baseline_field: str, keys: list[str]) -> Optional[str]:
    """'every' / 'k of n' keys on which the model's mean beats the baseline's mean, with the keys it does not."""
    lost = []
    for key in keys:
        model = _finite([_nested(r, field, key) for r in runs])
        base = _finite([_nested(r, baseline_field, key) for r in baseline_runs])
        if not model or not base:
            return None
        if statistics.fmean(model) <= statistics.fmean(base):
            lost.append(key)
    if not lost:
        return f"beats it on every one of {len(keys)}"
    return f"beats it on {len(keys) - len(lost)} of {len(keys)} (not on {', '.join(lost)})"


def _bar_values(grouped: dict[str, list[dict]], runs: list[dict], field: str, keys: list[str]) -> dict:
    """encoder or baseline -> {key: mean over runs of 100 x run[field][encoder][key]} for the bar plots:
    every model, each model's random init, and the model-independent baselines once."""
    def mean(selected: list[dict], name: str, key: str) -> float:
        found = _finite([_nested(run, f"{field}.{name}", key) for run in selected])
        return 100 * statistics.fmean(found) if found else math.nan

    bars = {}
    for model, model_runs in grouped.items():
        bars[model] = {key: mean(model_runs, "model", key) for key in keys}
        bars[f"{model} random init"] = {key: mean(model_runs, "random_init", key) for key in keys}
    for name, label in (("tfidf", "TF-IDF"), ("majority", "majority class")):
        bars[label] = {key: mean(runs, name, key) for key in keys}
    return {label: series for label, series in bars.items() if any(math.isfinite(v) for v in series.values())}


def _zero_shot_topic(run: dict, encoder: str = "model") -> Optional[float]:
    """Mean topic accuracy over the languages other than English (the zero-shot ones)."""
    accuracy = (run.get("topic") or {}).get(encoder) or {}
    found = _finite([v for lang, v in accuracy.items() if lang != "en"])
    return statistics.fmean(found) if found else None


def _average(values: dict) -> Optional[float]:
    found = _finite(list((values or {}).values()))
    return statistics.fmean(found) if found else None


def _pct(value: Optional[float]) -> str:
    return "–" if value is None or not math.isfinite(value) else f"{100 * value:.1f}"


def _upcycling_section(grouped: dict[str, list[dict]], settings: dict) -> list[str]:
    """"Does upcycling pay?": xmoe_upcycled beside xmoe from scratch and dense, per seed and mean,
    on the seeds where all three finished, with the baselines; empty when it has no run."""
    models = (*UPCYCLING_REFERENCES, UPCYCLED)
    if any(model not in grouped for model in models):
        return []
    seeds = sorted(set.intersection(*({run["seed"] for run in grouped[model]} for model in models)))
    if not seeds:
        return []
    if any(run["seed"] in seeds for run in grouped.get(RESTARTED, [])):  # the control, where it ran
        models = ("dense", RESTARTED, "xmoe", UPCYCLED)
    paired = {model: [run for run in grouped[model] if run["seed"] in seeds] for model in models}
    plan = paired[UPCYCLED][0]["run_settings"].get("upcycle", {})
    half = plan.get("at_update", settings["updates"] // 2)
    rf_updates = [update for run in paired[UPCYCLED] for update, _ in run.get("rf_curve") or []]
    rf_note = (f" RF is over the last {settings['checkpoint_every']} updates for every model."
               if all(update % settings["checkpoint_every"] == 0 for update in rf_updates)
               and len(rf_updates) > len(paired[UPCYCLED]) else "")
    lines = [
        "",
        "## Does upcycling pay? (X-MoE from the dense model at half way)",
        "",
        f"`{UPCYCLED}` is the dense run of the same seed at update {half} of {settings['updates']}, upcycled "
        "with `xmoe-upcycle` (every expert a copy of its layer's dense FFN, fresh routers, the `xmoe` model's "
        f"experts, layers and gate, expert noise {plan.get('expert_noise', 0)}), then trained as `xmoe` for the "
        f"other {plan.get('updates', settings['updates'] - half)} updates on the batches the dense run trained "
        f"on next, with a fresh Adam: {plan.get('warmup')} warm-up updates to lr {plan.get('lr', settings['lr'])}, "
        "then linear decay to 0. All models here trained on the same "
        f"{settings['updates']} batches."
        + (f" `{RESTARTED}`, the control, is the same dense model at update {half} restarted in the same way "
           "(fresh Adam, same warm-up and decay, same batches) without experts." if RESTARTED in models else "")
        + f"{rf_note} Topic accuracy is zero-shot (fine-tuned on English pages, "
        "averaged over the other languages).",
        "",
        "| seed | model | valid ppl | retrieval avg (%) | zero-shot topic avg (%) | topic en (%) | RF (last interval) | RC (last ckpt) |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def row(seed_label: str, label: str, runs: list[dict]) -> str:
        def cell(value_of, digits: int, scale: float = 1.0) -> str:
            return _cell([None if (v := value_of(r)) is None else scale * v for r in runs], digits)
        return (f"| {seed_label} | {label} | {cell(lambda r: r.get('valid_ppl'), 1)} | "
                f"{cell(lambda r: r.get('retrieval_avg'), 1, 100)} | {cell(_zero_shot_topic, 1, 100)} | "
                f"{cell(lambda r: _nested(r, 'topic.model', 'en'), 1, 100)} | {cell(lambda r: r.get('rf_final'), 3)} | "
                f"{cell(lambda r: r.get('rc_final'), 1)} |")

    for seed in seeds:
        for model in models:
            of_seed = [r for r in paired[model] if r["seed"] == seed]
            if of_seed:
                lines.append(row(str(seed), model, of_seed))
    if len(seeds) > 1:
        for model in models:
            lines.append(row("mean ± half-range", model, paired[model]))
    everything = [run for model in models for run in paired[model]]
    for name, label in (("random_init", "xmoe at random init"), ("tfidf", "TF-IDF"), ("majority", "majority class")):
        source = paired["xmoe"] if name == "random_init" else everything
        # the random init depends on the seed (mean over the seeds); TF-IDF and the majority class do not
        retrieval = [_average((r.get("retrieval") or {}).get(name)) for r in source]
        retrieval = _cell([100 * v for v in _finite(retrieval)], 1) if name == "random_init" else _pct(
            (_finite(retrieval) or [None])[0])
        with_topic = [r for r in source if (r.get("topic") or {}).get(name)][:1]
        topic = [_zero_shot_topic(r, name) for r in with_topic]
        topic_en = [_nested(r, f"topic.{name}", "en") for r in with_topic]
        lines.append(f"| baseline | {label} | – | {retrieval} | "
                     f"{_pct(topic[0] if topic else None)} | {_pct(topic_en[0] if topic_en else None)} | – | – |")
    losses = [(r["seed"], r.get("upcycled_from", {}).get("mlm_loss_at_update0") or {}) for r in paired[UPCYCLED]]
    losses = [(seed, loss) for seed, loss in losses if "dense" in loss and "upcycled" in loss]
    if losses:
        lines += ["", "MLM loss at the upcycling point (bits per masked token, 256 validation samples, "
                  "`xmoe-upcycle --data`): " + "; ".join(
                      f"seed {seed}: dense {loss['dense']:.3f}, upcycled {loss['upcycled']:.3f}"
                      + (f" (renormalized gates, no capacity limit {loss['renormalized_dropless']:.3f})"
                         if "renormalized_dropless" in loss else "") for seed, loss in losses) + "."]

    derived = {model: [{**run, "zero_shot_topic": _zero_shot_topic(run)} for run in paired[model]] for model in models}
    readings = []
    for reference in [model for model in models if model != UPCYCLED]:
        for metric, name, higher in _metrics("valid_ppl", "retrieval_avg", "zero_shot_topic", "rf_final", "rc_final"):
            found = _compare(derived, metric, reference, UPCYCLED, higher)
            if found:
                both = [seed for seed in seeds if _seed_value(derived[UPCYCLED], seed, metric) is not None
                        and _seed_value(derived[reference], seed, metric) is not None]
                values = [(_seed_value(derived[UPCYCLED], seed, metric), _seed_value(derived[reference], seed, metric))
                          for seed in both]
                wins = sum(1 for mine, theirs in values if (mine > theirs if higher else mine < theirs))
                readings.append(f"- vs {reference}, {name}: {found}; better in {wins} of {len(both)} seeds.")
    lines += ["", "Generated reading (means over the seeds above):", "", *readings]
    return lines


def _seed_value(runs: list[dict], seed: int, metric: str) -> Optional[float]:
    found = _finite([run.get(metric) for run in runs if run["seed"] == seed])
    return found[0] if found else None


def _kept_text(path: Path) -> str:
    if not path.is_file():
        return ""
    text = path.read_text()
    return text[text.index(KEPT_MARKER):] if KEPT_MARKER in text else ""


def write_reproduction_report(study: dict[str, Any], path: Path, plots_dir: Path) -> Path:
    from xmoe.analysis.plots import plot_grouped_bars, plot_metric_over_updates

    grouped = _by_model(study["runs"])
    models = list(grouped)
    plots_dir.mkdir(parents=True, exist_ok=True)
    plot_paths = {}
    curves = (  # key, y-axis label, title (short enough for the figure's width)
        ("rf_curve", "routing fluctuation vs. previous checkpoint", "routing fluctuation (mean over seeds)"),
        ("rc_curve", "RC, mean over MoE layers (higher = less collapsed)", "representation collapse (mean over seeds)"),
    )
    for key, label, title in curves:
        series = {m: curve for m in models if (curve := _mean_curve(grouped[m], key))[0]}
        if series:
            plot_paths[key] = plot_metric_over_updates(series, plots_dir / f"{key.split('_')[0]}.png", label, title=title)

    settings = study["settings"]
    missing = study.get("missing") or []
    lines = [
        "# Small-scale reproduction: dense vs SMoE vs X-MoE",
        "",
        "The tables, plots and plain reading are generated by `scripts/reproduce_small.py` from the",
        f"runs' metrics files in `{study.get('runs_dir', 'runs')}`; do not edit them by hand.",
        "",
        f"- Command: `{study['command']}`",
        f"- Data: `{study['data']}` (MLM + TLM, task `xmoe_mlm_tlm`, MLM:TLM batches "
        f"{settings.get('mlm_tlm_ratio', '1:1')}); zero-shot topic task: "
        + (f"`{study['topic_data']}`" if study.get("topic_data") else "not evaluated"),
        f"- Models: 4 layers, dim {settings.get('embed_dim', 64)}, FFN {settings.get('ffn_dim', 128)}, 4 heads; "
        f"MoE FFN in layers 1 and 3 with {settings['experts']} experts, top-1, X-MoE routing dim "
        f"{settings['routing_dim']}; the dense model has the same active size",
        f"- Recipe: `{study.get('recipe', '')}`, Adam lr {settings['lr']}, clip-norm 1.0",
        f"- {settings['updates']} updates of {settings['batch_size']} x {settings['tokens_per_sample']} tokens per run, "
        f"seeds {settings['seeds']}, checkpoints every {settings['checkpoint_every']} updates",
        f"- Hardware: {study['hardware']}; {_time_spent(study)}",
        f"- Runs: {len(study['runs'])} finished"
        + (f"; **missing: {', '.join(missing)}** (continue with the command above without "
           "`--report-only`; finished runs are reused)" if missing else ""),
        "",
        "## Results (mean ± half-range over seeds)",
        "",
        "| model | valid MLM/TLM ppl | retrieval acc (avg) | RF (last interval) | RC (last ckpt) | max expert load x E | wps |",
        "|---|---|---|---|---|---|---|",
    ]
    for model in models:
        runs = grouped[model]
        lines.append(
            f"| {model} | {_cell([r['valid_ppl'] for r in runs], 2)} | {_cell([r['retrieval_avg'] for r in runs])} | "
            f"{_cell([r.get('rf_final') for r in runs])} | {_cell([r.get('rc_final') for r in runs], 2)} | "
            f"{_cell([r.get('load_max') for r in runs], 2)} | {_cell([r['wps'] for r in runs], 0)} |"
        )
    lines += [
        "",
        "wps is fairseq-train's median tokens/s of each run. Runs go one after another, so other",
        "work on the machine at the time changes it: compare speed with benchmarks/bench_train.py,",
        "which interleaves the models in one process (docs/performance.md), not with this column.",
    ]
    groups = sorted({g for run in study["runs"] for g in run["valid_ppl_by_group"]})
    if groups:
        lines += ["", "### Validation perplexity per language and pair", "",
                  "| model | " + " | ".join(groups) + " |", "|---|" + "---|" * len(groups)]
        for model in models:
            cells = [_cell([r["valid_ppl_by_group"].get(g) for r in grouped[model]], 1) for g in groups]
            lines.append(f"| {model} | " + " | ".join(cells) + " |")
    pairs = sorted({p for run in study["runs"] for p in (run.get("retrieval") or {}).get("model", {})})
    if pairs:
        first = next(run["retrieval"] for run in study["runs"] if run.get("retrieval"))
        rows = []
        for model in models:
            rows.append((model, grouped[model], "retrieval.model"))
            rows.append((f"{model} at random init", grouped[model], "retrieval.random_init"))
        rows.append(("TF-IDF", grouped[models[0]][:1], "retrieval.tfidf"))
        lines += _per_key_table(
            f"### Retrieval accuracy per pair (%, both directions averaged; layer {first.get('layer')}, "
            f"centring: {first.get('centring')})", rows, pairs)
    languages = sorted({lang for run in study["runs"] for lang in (run.get("topic") or {}).get("model", {})},
                       key=lambda lang: (lang != "en", lang))
    if languages:
        rows = _topic_rows("topic", grouped, models, study["runs"])
        lines += _per_key_table(
            "### Zero-shot topic accuracy per language (%, fine-tuned on English pages; en = in-language)",
            [row for row in rows if row[1]], languages)
    probe_layers = sorted({run["topic_probe_layer"] for run in study["runs"] if run.get("topic_probe_layer") is not None})
    probe_languages = [lang for lang in languages if any(_nested(r, "topic_probe.model", lang) is not None
                                                         for r in study["runs"])]
    if probe_languages:
        probed = {model: [r for r in grouped[model] if r.get("topic_probe")] for model in models}
        rows = _topic_rows("topic_probe", probed, models, study["runs"])
        lines += _per_key_table(
            "### Zero-shot topic accuracy per language (%, frozen encoder, per-language centred linear probe "
            f"at layer {'/'.join(map(str, probe_layers))} trained on all English pages; en = in-language)",
            [row for row in rows if row[1] and any(_nested(r, row[2], k) is not None for r in row[1] for k in probe_languages)],
            probe_languages)
        unprobed = [f"{r['model']} seed {r['seed']}" for r in study["runs"] if not r.get("topic_probe")]
        if unprobed:
            lines += ["", "Not probed (finished before the probe was part of the study and their checkpoints "
                          "are not on this machine): " + ", ".join(unprobed) + "."]
    for field, keys, label, title in (
        ("retrieval", pairs, "retrieval accuracy (%)", "retrieval per pair (mean over seeds)"),
        ("topic", languages, "topic accuracy (%)", "zero-shot topic accuracy per language (mean over seeds)"),
    ):
        bars = _bar_values(grouped, study["runs"], field, keys)
        if bars:
            plot_paths[field] = plot_grouped_bars(bars, plots_dir / f"{field}.png", label, title)
    lines += _upcycling_section(grouped, settings)
    lines += ["", "## Plots", ""]
    for key, plot in plot_paths.items():
        lines.append(f"![{key}]({Path(plot).relative_to(path.parent)})")
    lines += [
        "",
        "## The paper's numbers, for reference (base size, 125k updates, 94 languages)",
        "",
        "| model | MLM ppl (mC4) | XTREME avg |",
        "|---|---|---|",
    ]
    for model, values in study["paper"].items():
        lines.append(f"| {model} | {values['mlm_ppl']} | {values['xtreme_avg']} |")

    lines += ["", "## Plain reading (generated from the table)", ""]
    readings = []
    for smoe, xmoe, gate in MOE_PAIRS:
        for metric, name, higher in _metrics("valid_ppl", "rf_final", "rc_final", "retrieval_avg"):
            found = _compare(grouped, metric, smoe, xmoe, higher)
            if found:
                readings.append(f"- {gate}, {name}: {found}.")
    for model in models:
        if model not in ("dense", RESTARTED):
            found = _compare(grouped, "valid_ppl", "dense", model, False)
            if found:
                readings.append(f"- MoE vs dense, validation perplexity: {found}.")
    for model in models:
        for what, field, keys in (("retrieval pairs", "retrieval", pairs),
                                  ("topic languages (fine-tuned)", "topic", languages),
                                  ("topic languages (probe)", "topic_probe", probe_languages)):
            if not keys:
                continue
            for baseline, name in (("random_init", "its own architecture at random init"), ("tfidf", "TF-IDF")):
                reference = grouped[model] if baseline == "random_init" else study["runs"]
                found = _beats(grouped[model], f"{field}.model", reference, f"{field}.{baseline}", keys)
                if found:
                    readings.append(f"- {model} vs {name}, {what}: {found}.")
    lines += readings or ["- nothing to compare (runs missing)."]
    lines += [
        "",
        "The paper's effects are claimed at base size after 125k updates; a tiny model after a few",
        "thousand updates on one help corpus can show them only weakly or not at all. Read a",
        "difference as real only where it is marked beyond the seed spread.",
        "",
    ]
    kept = _kept_text(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + ("\n" + kept if kept else ""))
    return path
