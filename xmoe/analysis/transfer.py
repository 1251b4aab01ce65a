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

from xmoe.analysis.baselines import DEFAULT_RANDOM_INIT_SEED, PieceTfidf, random_init_encoder
from xmoe.analysis.corpus import AnalysisInputError

TRANSFER_BASELINES = ("majority", "random_init", "tfidf")
FREEZE_FLAGS = {"experts": "--freeze-experts", "routing": "--freeze-routing", "none": "--no-freeze"}
TFIDF_C_GRID = (1.0, 0.1, 10.0, 100.0)  # on a tie in dev accuracy the earlier wins: scikit-learn's default first


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


# ---- the lexical baselines --------------------------------------------------------------------
def majority_baseline(train: list, tests: dict[str, list]) -> dict[str, Any]:
    counts = Counter(e.label for e in train)
    label = min(counts, key=lambda name: (-counts[name], name))  # most frequent; ties by name
    accuracy = {lang: sum(e.label == label for e in examples) / len(examples) for lang, examples in tests.items()}
    return {"label": label, "accuracy": accuracy}


def tfidf_baseline(model_dir: str, train: list, dev: list, tests: dict[str, list], max_length: int) -> dict[str, Any]:
    """Logistic regression on TF-IDF vectors of the model's own pieces (the first max_length - 2
    of each example, as the fine-tuned encoder reads them); C picked on the dev set."""
    from sklearn.linear_model import LogisticRegression

    from xmoe.tokenizer import XMoETokenizer

    tokenizer = XMoETokenizer.from_pretrained(model_dir)

    def pieces(examples: list) -> list[list[int]]:
        return [tokenizer.encode_body(e.text_a)[: max_length - 2] for e in examples]

    tfidf = PieceTfidf().fit(pieces(train))
    train_X, dev_X = tfidf.transform(pieces(train)), tfidf.transform(pieces(dev))
    train_y, dev_y = [e.label for e in train], [e.label for e in dev]
    best = None
    dev_accuracy = {}
    for C in TFIDF_C_GRID:
        classifier = LogisticRegression(C=C, max_iter=2000).fit(train_X, train_y)
        dev_accuracy[str(C)] = float(classifier.score(dev_X, dev_y))
        if best is None or dev_accuracy[str(C)] > dev_accuracy[str(best[0])]:
            best = (C, classifier)
    C, classifier = best
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
    progress(f"{len(train)} of {len(train_all)} English train pages (<= {settings.max_train_per_class} per "
             f"module), {len(dev)} dev pages, test pages " + ", ".join(f"{k} {len(v)}" for k, v in tests.items()))

    model_dir, described = exported_model(model, data, out_dir, progress)
    encoders = {"model": model_dir}
    if "random_init" in baselines:
        encoders["random_init"] = random_init_folder(model_dir, out_dir / "random_init", random_init_seed)
    results: dict[str, Any] = {}
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
        f"{result['unit'] or 'example'}; fine-tuned on {result['examples']['train']} {train_language} examples, "
        f"seeds {seeds}",
        f"{'language':<12} {'examples':>8}" + "".join(f" {titles[name]:>13}" for name in names),
    ]
    lines.append("-" * len(lines[-1]))
    for lang in result["languages"]:
        marker = " (train)" if lang == train_language else ""
        lines.append(f"{lang + marker:<12} {result['examples']['test'][lang]:>8}"
                     + "".join(f" {cell(name, lang):>13}" for name in names))
    lines.append(f"{'zero-shot':<12} {'':>8}" + "".join(f" {cell(name, None):>13}" for name in names))
    return "\n".join(lines)
