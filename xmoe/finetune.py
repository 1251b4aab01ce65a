"""`xmoe-finetune`: sentence(-pair) classification on an exported X-MoE encoder, trained on one
language and evaluated zero-shot on others (the XNLI / PAWS-X recipe of XTREME).

    xmoe-finetune exported/xmoe-base --train xnli/en.train.tsv --valid xnli/en.dev.tsv \\
        --eval en=xnli/en.test.tsv --eval de=xnli/de.test.tsv --output-dir runs/xnli

TSV files: one example per line, tab-separated columns `label<TAB>text_a[<TAB>text_b]`, UTF-8;
a first line whose first column is `label` is a header; blank lines are skipped; any other bad
line stops the run with `FILE:LINE: what is wrong`. Labels are names (any strings): their ids
follow the sorted names of the training file.

Writes OUTPUT_DIR/metrics.json (accuracy per --eval language, per-epoch training numbers),
OUTPUT_DIR/best/ (the selected model: an exported folder with the fine-tuned encoder plus
head.safetensors and head_config.json; load it with
xmoe.heads.XMoEForSequenceClassification.from_pretrained) and OUTPUT_DIR/tensorboard/.
See docs/finetune.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch

EXIT_BAD_INPUT = 2
HEADER_FIRST_COLUMN = "label"


class FinetuneError(Exception):
    """Bad input: one message, exit status 2, no traceback."""


@dataclass
class Example:
    label: str
    text_a: str
    text_b: Optional[str]
    where: str  # "FILE:LINE", for messages


def read_tsv(path: str) -> list[Example]:
    """The examples of a `label<TAB>text_a[<TAB>text_b]` file; FinetuneError names the bad line."""
    if not os.path.isfile(path):
        raise FinetuneError(f"{path}: no such file")
    examples: list[Example] = []
    columns: Optional[int] = None
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            where = f"{path}:{line_no}"
            try:
                line = raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as error:
                raise FinetuneError(f"{where}: not UTF-8 ({error.reason} at byte {error.start + 1})") from None
            if line_no == 1:
                line = line.lstrip("\ufeff")
            if not line.strip():
                continue
            fields = line.split("\t")
            if not examples and columns is None and fields[0].strip().lower() == HEADER_FIRST_COLUMN:
                columns = len(fields)  # a header: it also fixes the number of columns
                continue
            if len(fields) not in (2, 3):
                raise FinetuneError(
                    f"{where}: expected 2 or 3 tab-separated columns (label, text_a[, text_b]), got {len(fields)}"
                )
            if columns is None:
                columns = len(fields)
            elif len(fields) != columns:
                raise FinetuneError(f"{where}: {len(fields)} columns, but the file's first row has {columns}")
            label, text_a = fields[0].strip(), fields[1].strip()
            text_b = fields[2].strip() if len(fields) == 3 else None
            if not label:
                raise FinetuneError(f"{where}: empty label")
            if not text_a or text_b == "":
                raise FinetuneError(f"{where}: empty text in column {2 if not text_a else 3}")
            examples.append(Example(label, text_a, text_b, where))
    if not examples:
        raise FinetuneError(f"{path}: no examples")
    return examples


def parse_eval_option(value: str) -> tuple[str, str]:
    language, sep, path = value.partition("=")
    if not sep or not language or not path:
        raise argparse.ArgumentTypeError(f"expected LANG=PATH, got {value!r}")
    return language, path


# ---- training ---------------------------------------------------------------------------------
def make_batches(examples: list[Example], batch_size: int, generator: Optional[random.Random]) -> list[list[Example]]:
    order = list(range(len(examples)))
    if generator is not None:
        generator.shuffle(order)
    return [[examples[i] for i in order[start : start + batch_size]] for start in range(0, len(order), batch_size)]


class Encoder:
    """Examples -> model inputs and label ids, for one language."""

    def __init__(self, tokenizer, label_ids: dict[str, int], use_languages: bool, device: torch.device):
        self.tokenizer = tokenizer
        self.label_ids = label_ids
        self.use_languages = use_languages
        self.device = device

    def __call__(self, batch: list[Example], language: str) -> tuple[dict[str, Any], torch.Tensor]:
        texts = [e.text_a if e.text_b is None else (e.text_a, e.text_b) for e in batch]
        encoded = self.tokenizer.batch(texts, language if self.use_languages else None).to(self.device)
        labels_B = torch.tensor([self.label_ids[e.label] for e in batch], dtype=torch.long, device=self.device)
        return encoded.model_inputs(), labels_B


@torch.no_grad()
def evaluate(model, examples: list[Example], language: str, encode: Encoder, batch_size: int) -> dict[str, Any]:
    """Accuracy, and the share of tokens each expert of each MoE layer received."""
    model.eval()
    correct = 0
    load_LE = None
    for batch in make_batches(examples, batch_size, None):
        inputs, labels_B = encode(batch, language)
        out = model(**inputs)
        correct += int((out.logits.argmax(-1) == labels_B).sum())
        if out.routing:
            counts_LE = torch.stack(
                [torch.bincount(idx[idx >= 0], minlength=out.routing["expert_fraction"].shape[1]) for idx in out.routing["expert_index"]]
            )
            load_LE = counts_LE if load_LE is None else load_LE + counts_LE
    result: dict[str, Any] = {"accuracy": correct / len(examples), "examples": len(examples)}
    if load_LE is not None:
        result["expert_load"] = (load_LE.float() / load_LE.sum(1, keepdim=True).clamp(min=1)).tolist()
    return result


def linear_schedule(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int):
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(warmup_steps, 1)
        return max(0.0, (total_steps - step) / max(total_steps - warmup_steps, 1))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def finetune(args: argparse.Namespace, log=print) -> dict[str, Any]:
    """Run the recipe; returns what metrics.json holds. Raises FinetuneError on bad input."""
    from xmoe.heads import XMoEForSequenceClassification

    if not os.path.isfile(os.path.join(args.model, "config.json")):
        raise FinetuneError(f"{args.model} is not an exported xmoe model (no config.json); make one with xmoe-export")
    train = read_tsv(args.train)
    valid = read_tsv(args.valid) if args.valid else None
    eval_sets = [(language, path, read_tsv(path)) for language, path in args.eval]
    labels = sorted({e.label for e in train})
    if len(labels) < 2:
        raise FinetuneError(f"{args.train}: needs at least 2 different labels, found {labels}")
    label_ids = {name: i for i, name in enumerate(labels)}
    is_pair = train[0].text_b is not None
    for examples in [valid or []] + [s for _, _, s in eval_sets]:
        for example in examples:
            if example.label not in label_ids:
                raise FinetuneError(f"{example.where}: label {example.label!r} is not among the training labels {labels}")
            if (example.text_b is not None) != is_pair:
                raise FinetuneError(
                    f"{example.where}: {'one text' if is_pair else 'two texts'} expected, like the training file"
                )

    torch.manual_seed(args.seed)
    random.seed(args.seed)
    device = torch.device(args.device)
    try:
        model = XMoEForSequenceClassification.from_pretrained(
            args.model,
            device=str(device),
            num_labels=len(labels),
            labels=labels,
            pooling=args.pooling,
            dropout=args.dropout,
            freeze_routing=args.freeze_routing,
            freeze_experts=args.freeze_experts,
            balance_loss_weight=args.balance_loss_weight,
        )
    except (OSError, ValueError) as error:
        raise FinetuneError(f"cannot load {args.model}: {error}") from None
    tokenizer = model.tokenizer
    tokenizer.max_positions = min(args.max_length, model.encoder.cfg.max_positions)
    use_languages = model.encoder.cfg.num_languages > 0
    if use_languages:
        for language in [args.train_language] + [language for language, _, _ in eval_sets]:
            try:
                tokenizer.language_id(language)
            except ValueError as error:
                raise FinetuneError(str(error)) from None
    encode = Encoder(tokenizer, label_ids, use_languages, device)
    os.makedirs(args.output_dir, exist_ok=True)  # only once the inputs are known to be good

    trainable = model.trainable_parameters()
    optimizer = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=args.weight_decay)
    steps_per_epoch = math.ceil(len(train) / args.batch_size)
    total_steps = steps_per_epoch * args.epochs
    scheduler = linear_schedule(optimizer, int(args.warmup_ratio * total_steps), total_steps)
    writer = None
    if not args.no_tensorboard:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(os.path.join(args.output_dir, "tensorboard"))
    log(
        f"fine-tuning {args.model} on {len(train)} examples of {args.train} ({args.train_language}), "
        f"{len(labels)} labels {labels}, {args.epochs} epochs x {steps_per_epoch} steps; "
        f"{sum(p.numel() for p in trainable):,} trainable parameters, {len(model.frozen_parameters)} frozen MoE tensors"
    )

    shuffler = random.Random(args.seed)
    history: list[dict[str, Any]] = []
    best_score, best_epoch = -1.0, None
    best_dir = os.path.join(args.output_dir, "best")
    step = 0
    started = time.time()
    for epoch in range(1, args.epochs + 1):
        model.train()
        sums = {"loss": 0.0, "task_loss": 0.0, "balance_loss": 0.0}
        batches = make_batches(train, args.batch_size, shuffler)
        for batch_index, batch in enumerate(batches, start=1):
            inputs, labels_B = encode(batch, args.train_language)
            out = model(**inputs, labels=labels_B)
            optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            if args.clip_norm > 0:
                torch.nn.utils.clip_grad_norm_(trainable, args.clip_norm)
            optimizer.step()
            scheduler.step()
            step += 1
            values = {"loss": out.loss.item(), "task_loss": out.task_loss.item(), "balance_loss": out.balance_loss.item()}
            for key, value in values.items():
                sums[key] += value
            if writer is not None:
                for key, value in values.items():
                    writer.add_scalar(f"train/{key}", value, step)
                writer.add_scalar("train/lr", scheduler.get_last_lr()[0], step)
            if step % args.log_interval == 0 or batch_index == len(batches):
                log(
                    f"epoch {epoch}/{args.epochs} step {batch_index}/{len(batches)}: loss {values['loss']:.4f} "
                    f"(task {values['task_loss']:.4f}, balance {values['balance_loss']:.4f}), "
                    f"lr {scheduler.get_last_lr()[0]:.2e}, {time.time() - started:.0f} s"
                )
        record: dict[str, Any] = {"epoch": epoch, **{f"train_{k}": v / len(batches) for k, v in sums.items()}}
        if valid is not None:
            record["valid_accuracy"] = evaluate(model, valid, args.train_language, encode, args.batch_size)["accuracy"]
            if writer is not None:
                writer.add_scalar("valid/accuracy", record["valid_accuracy"], epoch)
            log(f"epoch {epoch}: valid accuracy {record['valid_accuracy']:.4f}")
        history.append(record)
        # Model selection on the training language's dev set only (zero-shot: the other
        # languages are never looked at); without --valid the last epoch is kept.
        score = record.get("valid_accuracy", float(epoch))
        if score > best_score:
            best_score, best_epoch = score, epoch
            model.save(best_dir, args.model)
            log(f"epoch {epoch}: saved {best_dir}")

    best = XMoEForSequenceClassification.from_pretrained(best_dir, device=str(device))
    results = {language: evaluate(best, examples, language, encode, args.batch_size) for language, _, examples in eval_sets}
    zero_shot = [r["accuracy"] for language, r in results.items() if language != args.train_language]
    metrics = {
        "model": os.path.abspath(args.model),
        "train": {"path": os.path.abspath(args.train), "language": args.train_language, "examples": len(train)},
        "labels": labels,
        "selection": f"best valid accuracy on {args.valid}" if valid is not None else "last epoch (no --valid)",
        "best_epoch": best_epoch,
        "epochs": history,
        "accuracy": {language: r["accuracy"] for language, r in results.items()},
        "zero_shot_average": sum(zero_shot) / len(zero_shot) if zero_shot else None,
        "eval": {language: {"path": os.path.abspath(path), **results[language]} for language, path, _ in eval_sets},
        "options": {k: v for k, v in vars(args).items() if k != "eval"},
    }
    for language, result in results.items():
        log(f"{language}: accuracy {result['accuracy']:.4f} on {result['examples']} examples")
        if writer is not None:
            writer.add_scalar(f"eval/{language}_accuracy", result["accuracy"], best_epoch)
    if writer is not None:
        writer.close()
    with open(os.path.join(args.output_dir, "metrics.json"), "w", encoding="utf-8") as f:
        json.dump(metrics, f, indent=2)
    log(f"wrote {os.path.join(args.output_dir, 'metrics.json')}")
    return metrics


# ---- command line ----------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="xmoe-finetune",
        description="Fine-tune an exported X-MoE encoder for sentence(-pair) classification on one language's "
        "TSV and evaluate it zero-shot on other languages' TSVs (columns: label, text_a[, text_b]).",
        epilog="example: xmoe-finetune exported/xmoe-base --train en.train.tsv --valid en.dev.tsv "
        "--eval en=en.test.tsv --eval de=de.test.tsv --output-dir runs/xnli",
    )
    parser.add_argument("model", metavar="MODEL_DIR", help="folder written by xmoe-export")
    parser.add_argument("--train", required=True, metavar="PATH", help="training TSV (the source language, e.g. English)")
    parser.add_argument("--train-language", default="en", metavar="LANG", help="language code of --train (default: %(default)s)")
    parser.add_argument(
        "--valid", metavar="PATH", help="dev TSV in the training language, for picking the best epoch (default: keep the last)"
    )
    parser.add_argument(
        "--eval",
        action="append",
        default=[],
        type=parse_eval_option,
        metavar="LANG=PATH",
        help="test TSV of one language, evaluated with the selected model; repeat per language",
    )
    parser.add_argument("--output-dir", required=True, metavar="DIR", help="where metrics.json, best/ and tensorboard/ go")
    parser.add_argument("--epochs", type=int, default=3, help="passes over --train (default: %(default)s)")
    parser.add_argument("--lr", type=float, default=2e-5, help="peak learning rate of AdamW (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=32, help="examples per update (default: %(default)s)")
    parser.add_argument(
        "--max-length", type=int, default=128, help="max tokens per example, special tokens included (default: %(default)s)"
    )
    parser.add_argument("--seed", type=int, default=1, help="seed of initialization, dropout and shuffling (default: %(default)s)")
    parser.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay (default: %(default)s)")
    parser.add_argument(
        "--warmup-ratio", type=float, default=0.1, help="share of the steps with linear warm-up, then linear decay (default: %(default)s)"
    )
    parser.add_argument("--clip-norm", type=float, default=1.0, help="gradient norm clipping; 0 = off (default: %(default)s)")
    parser.add_argument("--dropout", type=float, default=0.1, help="dropout of the classification head (default: %(default)s)")
    parser.add_argument(
        "--pooling", choices=("first", "mean"), default="first", help="sentence vector: the <s> state or the mean over tokens (default: %(default)s)"
    )
    freezing = parser.add_mutually_exclusive_group()
    freezing.add_argument(
        "--freeze-experts",
        dest="freeze_experts",
        action="store_true",
        default=True,
        help="freeze routers and expert FFNs, the paper's fine-tuning setting (default)",
    )
    freezing.add_argument(
        "--freeze-routing", action="store_true", help="freeze only the routers; the expert FFNs train"
    )
    freezing.add_argument(
        "--no-freeze", action="store_true", help="train everything, routers and experts included"
    )
    parser.add_argument(
        "--balance-loss-weight",
        type=float,
        default=0.01,
        help="weight of the MoE balance loss added to the task loss; it stays on with frozen routers, where it "
        "trains the layers below the MoE layers (default: %(default)s, the paper's)",
    )
    parser.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device (default: %(default)s)"
    )
    parser.add_argument("--log-interval", type=int, default=50, help="print progress every N updates (default: %(default)s)")
    parser.add_argument("--no-tensorboard", action="store_true", help="do not write OUTPUT_DIR/tensorboard")
    return parser


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    if args.freeze_routing or args.no_freeze:
        args.freeze_experts = False
    for name in ("epochs", "batch_size", "max_length", "log_interval"):
        if getattr(args, name) < 1:
            build_parser().error(f"--{name.replace('_', '-')} must be >= 1")
    if args.max_length < 3:
        build_parser().error("--max-length must be >= 3")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    try:
        finetune(args)
    except FinetuneError as error:
        print(f"xmoe-finetune: error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return 0


def cli() -> None:
    sys.exit(main())


if __name__ == "__main__":
    cli()
