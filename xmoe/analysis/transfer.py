"""Zero-shot cross-lingual topic transfer: fine-tune on English, test on every language.

The task is the one data-prep/build_topic_task.py writes from the LibreOffice help (each page's
module, sbasic ... swriter, from its text; split by page, so no test page's English version
is trained on). One call evaluates, on the same capped English training set and the same test
pages:

- the model: fine-tuned with xmoe-finetune's recipe (routers and experts frozen by default, as
  in the paper), once per seed, the epoch picked on the English dev set only;
- random_init: the same config at random initialisation (fixed torch seed), fine-tuned the
  very same way with the same seeds;
- tfidf: logistic regression on TF-IDF vectors of the same sentencepiece pieces (the same
  tokenizer, cut at the same length), trained on the same English examples, its inverse
  regularisation C picked on the English dev set;
- majority: the most frequent label of the English training file.

With method="probe" the encoders are not fine-tuned: a frozen linear probe replaces the
fine-tuning for the model and the random-init baseline alike (`probe_and_evaluate`): the
mean-pooled features of one layer, centred per language (`baselines.centre`: English train and
dev pages by the English train mean, each test language by the mean of its own test pages;
unlabelled text only), standardised with the English train statistics, and a logistic
regression trained on the English train pages, its C picked on the English dev pages.
Centring removes the per-language offset of the embedding space, which otherwise puts every
other language in a region where the English head does not apply.

Accuracy is reported per language; the zero-shot average leaves out the training language.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import statistics
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from xmoe.analysis.baselines import (
    CENTRINGS, DEFAULT_CENTRING, DEFAULT_RANDOM_INIT_SEED, PieceTfidf, centre, random_init_encoder,
)
from xmoe.analysis.corpus import AnalysisInputError

TRANSFER_BASELINES = ("majority", "random_init", "tfidf")
METHODS = ("finetune", "probe")
FREEZE_FLAGS = {"experts": "--freeze-experts", "routing": "--freeze-routing", "none": "--no-freeze"}
# Inverse regularisation of every logistic regression here (TF-IDF baseline, frozen probe);
# on a tie in dev accuracy the earlier wins: scikit-learn's default first.
LOGISTIC_C_GRID = (1.0, 0.1, 10.0, 100.0)


@dataclass
class TransferSettings:
    """How every encoder is fine-tuned (the defaults fit xmoe_tiny on 2 CPU cores: a few minutes
    for the model and its random-init baseline together; see docs/analysis.md)."""

    epochs: int = 4
    lr: float = 1e-3
    batch_size: int = 32
    max_length: int = 96  # pieces per example, <s> and </s> included; the TF-IDF model sees the same
    max_train_per_class: Optional[int] = 100  # the first N English train pages of each module
    max_test_per_language: Optional[int] = None  # the first N test pages of each language
    pooling: str = "mean"
    freeze: str = "experts"
    device: str = "cpu"
    method: str = "finetune"  # or "probe": frozen encoder, linear probe (module doc)
    layer: Optional[int] = None  # probe only: 0 = embeddings, k = after layer k (None: the retrieval default)
    centring: str = DEFAULT_CENTRING  # probe only: "language" or "none"


# ---- the task ---------------------------------------------------------------------------------
@dataclass
class TopicTask:
    root: Path
    manifest: dict[str, Any]

    @property
    def languages(self) -> list[str]:
        return list(self.manifest["languages"])

    @property
    def train_language(self) -> str:
        return self.manifest["train_language"]

    def path(self, split: str, language: Optional[str] = None) -> Path:
        name = self.manifest["files"][split]
        return self.root / (name[language] if split == "test" else name)


def load_topic_task(root: str) -> TopicTask:
    """The folder of data-prep/build_topic_task.py, checked for its manifest and files."""
    folder = Path(root)
    manifest_path = folder / "manifest.json"
    if not manifest_path.is_file():
        raise AnalysisInputError(
            f"--topic-data {root}: no manifest.json (build the task with data-prep/build_topic_task.py)")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        task = TopicTask(folder, manifest)
        files = [task.path("train"), task.path("dev")] + [task.path("test", lang) for lang in task.languages]
    except (ValueError, KeyError, TypeError) as error:
        raise AnalysisInputError(f"{manifest_path} is not a topic task manifest: {error}") from None
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise AnalysisInputError(f"--topic-data {root}: missing {', '.join(missing)}")
    return task


def read_examples(path: Path):
    """xmoe-finetune's reader, its errors as AnalysisInputError."""
    from xmoe.finetune import FinetuneError, read_tsv

    try:
        return read_tsv(str(path))
    except FinetuneError as error:
        raise AnalysisInputError(str(error)) from None


def first_per_label(examples: list, limit: Optional[int]) -> list:
    """The first `limit` examples of each label, in file order (None: all)."""
    if limit is None:
        return list(examples)
    seen: Counter = Counter()
    kept = []
    for example in examples:
        if seen[example.label] < limit:
            seen[example.label] += 1
            kept.append(example)
    return kept


def write_tsv(path: Path, examples: list) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.write("label\ttext\n")
        for example in examples:
            f.write(f"{example.label}\t{example.text_a}\n")


# ---- the encoders -----------------------------------------------------------------------------
def exported_model(model: str, data: Optional[str], out: Path, log: Callable[[str], None]) -> tuple[str, dict]:
    """(an exported folder, a description) for MODEL: used as is when it is an exported folder,
    exported to OUT/exported when it is a fairseq checkpoint (its tokenizer from --data, or the
    data folder the checkpoint was trained on)."""
    if os.path.isdir(model):
        if not os.path.isfile(os.path.join(model, "config.json")):
            raise AnalysisInputError(f"{model} is a folder but not an exported model (no config.json)")
        return model, {"path": model}
    if not os.path.isfile(model):
        raise AnalysisInputError(f"model {model} does not exist")
    from xmoe.analysis.probe import load_checkpoint_for_analysis
    from xmoe.export import ExportError, export

    checkpoint = load_checkpoint_for_analysis(model, need_moe=False)  # clear errors for a bad file
    target = out / "exported"
    try:
        export(model, str(target), data_dir=data, force=True, verify=False, log=log)
    except ExportError as error:
        raise AnalysisInputError(f"cannot export {model}: {error}") from None
    return str(target), checkpoint.describe()


def random_init_folder(model_dir: str, target: Path, seed: int) -> str:
    """An exported folder beside `model_dir`'s: the same files, with the weights of the same
    config at random initialisation (torch seed `seed`)."""
    from safetensors.torch import save_file

    from xmoe.export import export_weights
    from xmoe.hub import WEIGHTS_FILE, read_config

    config, _ = read_config(model_dir)
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    for name in os.listdir(model_dir):
        source = os.path.join(model_dir, name)
        if os.path.isfile(source) and name != WEIGHTS_FILE:
            shutil.copyfile(source, target / name)
    encoder = random_init_encoder(config, seed)
    save_file(export_weights(encoder), str(target / WEIGHTS_FILE), metadata={"format": "pt"})
    return str(target)


def finetune_and_evaluate(
    model_dir: str, train: Path, dev: Path, tests: dict[str, Path], train_language: str, seed: int,
    settings: TransferSettings, run_dir: Path,
) -> dict[str, float]:
    """Accuracy per test language of `model_dir` fine-tuned by xmoe-finetune (its log in
    run_dir/finetune.log; the fine-tuned weights are not kept)."""
    from xmoe.finetune import main as finetune_main

    run_dir.mkdir(parents=True, exist_ok=True)
    argv = [
        model_dir, "--train", str(train), "--train-language", train_language, "--valid", str(dev),
        *(f"--eval={lang}={path}" for lang, path in tests.items()),
        "--output-dir", str(run_dir), "--seed", str(seed), "--epochs", str(settings.epochs),
        "--lr", str(settings.lr), "--batch-size", str(settings.batch_size),
        "--max-length", str(settings.max_length), "--pooling", settings.pooling,
        FREEZE_FLAGS[settings.freeze], "--device", settings.device, "--no-tensorboard",
    ]
    log_path = run_dir / "finetune.log"
    with open(log_path, "w", encoding="utf-8") as log_file:
        log_file.write("xmoe-finetune " + " ".join(argv) + "\n")
        log_file.flush()
        with contextlib.redirect_stdout(log_file), contextlib.redirect_stderr(log_file):
            status = finetune_main(argv)
    if status != 0:
        last = log_path.read_text(encoding="utf-8").strip().splitlines()[-1:]
        raise AnalysisInputError(f"xmoe-finetune failed on {model_dir} ({log_path}): {' '.join(last)}")
    metrics = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
    shutil.rmtree(run_dir / "best", ignore_errors=True)
    return {lang: float(metrics["accuracy"][lang]) for lang in tests}


def probe_features(model, examples: list, language: str, layer: int, settings: TransferSettings):
    """(N, C) float64 array: `layer`'s hidden states of each example (its first max_length - 2
    pieces between <s> and </s>, as the fine-tuned encoder reads it), pooled per
    settings.pooling over the real tokens. `model` is a hub model; language ids are given to
    models with language embeddings."""
    import torch

    tokenizer = model.tokenizer
    rows = [[tokenizer.bos_id, *tokenizer.encode_body(e.text_a)[: settings.max_length - 2], tokenizer.eos_id]
            for e in examples]
    languages = language if model.config.num_languages else None
    pooled = []
    for start in range(0, len(rows), settings.batch_size):
        batch = tokenizer.batch(rows[start:start + settings.batch_size], languages)
        pooled.append(model.sentence_embeddings(batch, layer=layer, pooling=settings.pooling))
    return torch.cat(pooled).double().cpu().numpy()


def linear_probe(train_X, train_y, dev_X, dev_y, tests: dict[str, tuple], centring: str, seed: int) -> dict[str, Any]:
    """Accuracy per test language of a logistic regression on frozen features (module doc).

    train_X, dev_X: (N, C) features of the training language; tests: {language: ((N, C)
    features, labels)}. centring="language": train and dev minus the train mean, each test
    language minus its own mean; "none": raw features. Then standardised with the train
    statistics; C picked on dev accuracy."""
    from sklearn.preprocessing import StandardScaler

    train_mean = train_X.mean(0, keepdims=True) if centring == "language" else 0.0
    train_centred = centre(train_X, centring)
    scaler = StandardScaler().fit(train_centred)
    C, classifier, dev_accuracy = logistic_regression_on_dev(
        scaler.transform(train_centred), train_y, scaler.transform(dev_X - train_mean), dev_y,
        seed=seed, max_iter=5000)
    accuracy = {lang: float(classifier.score(scaler.transform(centre(X, centring)), y))
                for lang, (X, y) in tests.items()}
    return {"C": C, "dev_accuracy_by_C": dev_accuracy, "accuracy": accuracy}


def probe_and_evaluate(
    model_dir: str, train: list, dev: list, tests: dict[str, list], train_language: str, seeds: Sequence[int],
    layer: int, settings: TransferSettings, progress: Callable[[str], None],
) -> dict[str, Any]:
    """summarise() of linear_probe per seed on the frozen encoder of `model_dir` (dropless: an
    example's features do not depend on the rest of its batch), plus the C picked per seed."""
    from xmoe import hub

    step = time.perf_counter()
    model = hub.load(model_dir, device=settings.device, eval_capacity_factor=0.0)
    train_X = probe_features(model, train, train_language, layer, settings)
    dev_X = probe_features(model, dev, train_language, layer, settings)
    tests_Xy = {lang: (probe_features(model, examples, lang, layer, settings), [e.label for e in examples])
                for lang, examples in tests.items()}
    by_seed, chosen_C = {}, {}
    for seed in seeds:
        probe = linear_probe(train_X, [e.label for e in train], dev_X, [e.label for e in dev], tests_Xy,
                             settings.centring, seed)
        by_seed[seed], chosen_C[str(seed)] = probe["accuracy"], probe["C"]
        progress(f"probe of {model_dir}, layer {layer}, seed {seed}: C {probe['C']}, "
                 + ", ".join(f"{k} {v:.3f}" for k, v in probe["accuracy"].items()))
    progress(f"probe of {model_dir}: {time.perf_counter() - step:.0f} s")
    return {**summarise(by_seed, train_language), "C": chosen_C}


# ---- the lexical baselines --------------------------------------------------------------------
def majority_baseline(train: list, tests: dict[str, list]) -> dict[str, Any]:
    counts = Counter(e.label for e in train)
    label = min(counts, key=lambda name: (-counts[name], name))  # most frequent; ties by name
    accuracy = {lang: sum(e.label == label for e in examples) / len(examples) for lang, examples in tests.items()}
    return {"label": label, "accuracy": accuracy}


def logistic_regression_on_dev(train_X, train_y, dev_X, dev_y, seed: Optional[int] = None, max_iter: int = 2000):
    """(C, classifier, dev accuracy per C): scikit-learn's LogisticRegression fitted on the
    train rows for every C of LOGISTIC_C_GRID, the C with the best dev accuracy kept."""
    from sklearn.linear_model import LogisticRegression

    best = None
    dev_accuracy = {}
    for C in LOGISTIC_C_GRID:
        classifier = LogisticRegression(C=C, max_iter=max_iter, random_state=seed).fit(train_X, train_y)
        dev_accuracy[str(C)] = float(classifier.score(dev_X, dev_y))
        if best is None or dev_accuracy[str(C)] > dev_accuracy[str(best[0])]:
            best = (C, classifier)
    return best[0], best[1], dev_accuracy


def tfidf_baseline(model_dir: str, train: list, dev: list, tests: dict[str, list], max_length: int) -> dict[str, Any]:
    """Logistic regression on TF-IDF vectors of the model's own pieces (the first max_length - 2
    of each example, as the fine-tuned encoder reads them); C picked on the dev set."""
    from xmoe.tokenizer import XMoETokenizer

    tokenizer = XMoETokenizer.from_pretrained(model_dir)

    def pieces(examples: list) -> list[list[int]]:
        return [tokenizer.encode_body(e.text_a)[: max_length - 2] for e in examples]

    tfidf = PieceTfidf().fit(pieces(train))
    train_X, dev_X = tfidf.transform(pieces(train)), tfidf.transform(pieces(dev))
    C, classifier, dev_accuracy = logistic_regression_on_dev(
        train_X, [e.label for e in train], dev_X, [e.label for e in dev])
    accuracy = {
        lang: float(classifier.score(tfidf.transform(pieces(examples)), [e.label for e in examples]))
        for lang, examples in tests.items()
    }
    return {"C": C, "dev_accuracy_by_C": dev_accuracy, "accuracy": accuracy}


# ---- the benchmark ----------------------------------------------------------------------------
def summarise(by_seed: dict[int, dict[str, float]], train_language: str) -> dict[str, Any]:
    languages = list(next(iter(by_seed.values())))
    mean = {lang: statistics.fmean(r[lang] for r in by_seed.values()) for lang in languages}
    std = {lang: statistics.pstdev([r[lang] for r in by_seed.values()]) for lang in languages}
    return {"accuracy": mean, "std": std, "by_seed": {str(s): r for s, r in by_seed.items()},
            "zero_shot_average": zero_shot_average(mean, train_language)}


def zero_shot_average(accuracy: dict[str, float], train_language: str) -> Optional[float]:
    others = [value for lang, value in accuracy.items() if lang != train_language]
    return statistics.fmean(others) if others else None


def evaluate_transfer(
    model: str,
    topic_data: str,
    out: str,
    data: Optional[str] = None,
    seeds: Sequence[int] = (1,),
    baselines: Sequence[str] = TRANSFER_BASELINES,
    random_init_seed: int = DEFAULT_RANDOM_INIT_SEED,
    languages: Optional[Sequence[str]] = None,
    settings: Optional[TransferSettings] = None,
    progress: Callable[[str], None] = lambda message: None,
) -> dict[str, Any]:
    """Run the benchmark (module doc) and return what transfer.json holds. MODEL is an exported
    folder or an xmoe_encoder checkpoint (exported to OUT/exported with the tokenizer of `data`,
    default the data the checkpoint was trained on)."""
    settings = settings or TransferSettings()
    if settings.method not in METHODS:
        raise AnalysisInputError(f"--method must be one of {', '.join(METHODS)}, got {settings.method!r}")
    if settings.centring not in CENTRINGS:
        raise AnalysisInputError(f"--centring must be one of {', '.join(CENTRINGS)}, got {settings.centring!r}")
    if not seeds:
        raise AnalysisInputError("--seeds: give at least one seed")
    unknown = [b for b in baselines if b not in TRANSFER_BASELINES]
    if unknown:
        raise AnalysisInputError(f"unknown baseline(s) {unknown}; choose from {', '.join(TRANSFER_BASELINES)}")
    if settings.freeze not in FREEZE_FLAGS:
        raise AnalysisInputError(f"--freeze must be one of {', '.join(FREEZE_FLAGS)}, got {settings.freeze!r}")
    task = load_topic_task(topic_data)
    if languages:
        missing = [lang for lang in languages if lang not in task.languages]
        if missing:
            raise AnalysisInputError(
                f"--languages: no test data for {', '.join(missing)} in {topic_data} (it has {', '.join(task.languages)})")
    else:
        languages = task.languages
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    train_all = read_examples(task.path("train"))
    train = first_per_label(train_all, settings.max_train_per_class)
    dev = read_examples(task.path("dev"))
    tests = {lang: read_examples(task.path("test", lang))[: settings.max_test_per_language] for lang in languages}
    train_path, test_paths = out_dir / "train.tsv", {}
    write_tsv(train_path, train)
    for lang, examples in tests.items():
        test_paths[lang] = out_dir / f"{lang}.test.tsv"
        write_tsv(test_paths[lang], examples)
    cap = "all" if settings.max_train_per_class is None else f"<= {settings.max_train_per_class} per module"
    progress(f"{len(train)} of {len(train_all)} English train pages ({cap}), {len(dev)} dev pages, test pages "
             + ", ".join(f"{k} {len(v)}" for k, v in tests.items()))

    model_dir, described = exported_model(model, data, out_dir, progress)
    encoders = {"model": model_dir}
    if "random_init" in baselines:
        encoders["random_init"] = random_init_folder(model_dir, out_dir / "random_init", random_init_seed)
    results: dict[str, Any] = {}
    layer = None
    if settings.method == "probe":
        from xmoe.hub import read_config
        from xmoe.retrieval import default_retrieval_layer

        num_layers = read_config(model_dir)[0].encoder_layers
        layer = default_retrieval_layer(num_layers) if settings.layer is None else settings.layer
        if not 0 <= layer <= num_layers:
            raise AnalysisInputError(f"--layer {layer}: the model has layers 0..{num_layers}")
        for name, folder in encoders.items():
            results[name] = probe_and_evaluate(folder, train, dev, tests, task.train_language, seeds, layer,
                                               settings, progress)
    else:
        for name, folder in encoders.items():
            by_seed = {}
            for seed in seeds:
                step = time.perf_counter()
                by_seed[seed] = finetune_and_evaluate(
                    folder, train_path, task.path("dev"), test_paths, task.train_language, seed, settings,
                    out_dir / "runs" / f"{name}-seed{seed}",
                )
                progress(f"{name}, seed {seed}: " + ", ".join(f"{k} {v:.3f}" for k, v in by_seed[seed].items())
                         + f" ({time.perf_counter() - step:.0f} s)")
            results[name] = summarise(by_seed, task.train_language)
    if "random_init" in results:
        results["random_init"]["init_seed"] = random_init_seed
    if "tfidf" in baselines:
        results["tfidf"] = tfidf_baseline(model_dir, train, dev, tests, settings.max_length)
    if "majority" in baselines:  # the prior of the whole English training file, not of its capped subset
        results["majority"] = majority_baseline(train_all, tests)
    for name in ("tfidf", "majority"):
        if name in results:
            results[name]["zero_shot_average"] = zero_shot_average(results[name]["accuracy"], task.train_language)

    return {
        "command": "transfer",
        "model": described,
        "topic_data": str(task.root),
        "task": task.manifest.get("task"),
        "unit": task.manifest.get("unit"),
        "labels": sorted({e.label for e in train}),
        "train_language": task.train_language,
        "languages": list(languages),
        "seeds": list(seeds),
        "method": settings.method,
        "layer": layer,
        "centring": settings.centring if settings.method == "probe" else None,
        "examples": {"train": len(train), "dev": len(dev), "test": {k: len(v) for k, v in tests.items()}},
        "settings": {**vars(settings), "random_init_seed": random_init_seed},
        "results": results,
        "seconds": round(time.perf_counter() - started, 1),
    }


def format_transfer_table(result: dict[str, Any]) -> str:
    """Accuracy per language (rows) for the model and each baseline (columns), in percent;
    fine-tuned encoders as mean +- standard deviation over the seeds."""
    titles = {"model": "model", "random_init": "random init", "tfidf": "TF-IDF+LR", "majority": "majority"}
    names = [name for name in titles if name in result["results"]]
    train_language = result["train_language"]

    def cell(name: str, lang: Optional[str]) -> str:
        r = result["results"][name]
        value = r["zero_shot_average"] if lang is None else r["accuracy"][lang]
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return "-"
        if "std" in r and lang is not None and len(result["seeds"]) > 1:
            return f"{100 * value:.1f} ± {100 * r['std'][lang]:.1f}"
        return f"{100 * value:.1f}"

    seeds = ",".join(map(str, result["seeds"]))
    lines = [
        f"zero-shot topic accuracy (%), {len(result['labels'])} LibreOffice modules, one example per "
        f"{result['unit'] or 'example'}; "
        + (f"frozen layer-{result['layer']} probe ({result['centring']} centring) trained"
           if result.get("method") == "probe" else "fine-tuned")
        + f" on {result['examples']['train']} {train_language} examples, seeds {seeds}",
        f"{'language':<12} {'examples':>8}" + "".join(f" {titles[name]:>13}" for name in names),
    ]
    lines.append("-" * len(lines[-1]))
    for lang in result["languages"]:
        marker = " (train)" if lang == train_language else ""
        lines.append(f"{lang + marker:<12} {result['examples']['test'][lang]:>8}"
                     + "".join(f" {cell(name, lang):>13}" for name in names))
    lines.append(f"{'zero-shot':<12} {'':>8}" + "".join(f" {cell(name, None):>13}" for name in names))
    return "\n".join(lines)
