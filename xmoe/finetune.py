"""`xmoe-finetune`: sentence(-pair) classification on an exported X-MoE encoder, trained on one
language and evaluated zero-shot on others (the XNLI / PAWS-X recipe of XTREME).

    xmoe-finetune exported/xmoe-base --train xnli/en.train.tsv --valid xnli/en.dev.tsv \\
        --eval en=xnli/en.test.tsv --eval de=xnli/de.test.tsv --output-dir runs/xnli

TSV files: one example per line, tab-separated columns `label<TAB>text_a[<TAB>text_b]`, UTF-8;
a first line whose first column is `label` is a header; blank lines are skipped; any other bad
line stops the run with `FILE:LINE: what is wrong`. Labels are names (any strings): their ids
follow the sorted names of the training file.

Training runs on transformers.Trainer (AdamW, linear warm-up and decay, gradient clipping,
tensorboard, CPU or GPU) with the export's AutoModelForSequenceClassification class
(xmoe.hf.modeling_xmoe) and its standard tokenizer; evaluation per language and model
selection on the training language's dev set are this module's.

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
FREEZE_SETTINGS = {"freeze_experts": "router_and_experts", "freeze_routing": "router", "no_freeze": "none"}


def load_tokenizer(model_dir: str, max_length: int):
    """The export's standard tokenizer (tokenizer.json); for a folder exported before it existed,
    the same tokenizer built from its sentencepiece model and dict.txt."""
    from transformers import PreTrainedTokenizerFast

    from xmoe.hf.tokenization import FAST_TOKENIZER_FILE, build_fast_tokenizer
    from xmoe.tokenizer import DICT_FILE, SPM_FILE

    if os.path.isfile(os.path.join(model_dir, FAST_TOKENIZER_FILE)):
        tokenizer = PreTrainedTokenizerFast.from_pretrained(model_dir)
    else:
        tokenizer = build_fast_tokenizer(os.path.join(model_dir, SPM_FILE), os.path.join(model_dir, DICT_FILE))
    tokenizer.model_max_length = max_length
    return tokenizer


def make_features(tokenizer, examples: list[Example], label_ids: dict[str, int], language_id: Optional[int]) -> list[dict]:
    """One dict per example: input_ids, attention_mask, labels[, language_ids] (what the data
    collator pads and the model takes). Texts are cut to the tokenizer's model_max_length."""
    features = []
    for e in examples:
        feature = dict(tokenizer(e.text_a, e.text_b, truncation=True))
        feature["labels"] = label_ids[e.label]
        if language_id is not None:
            feature["language_ids"] = language_id
        features.append(feature)
    return features


@torch.no_grad()
def evaluate(model, features: list[dict], collator, batch_size: int) -> dict[str, Any]:
    """Accuracy, and the share of tokens each expert of each MoE layer received."""
    model.eval()
    correct = 0
    load_LE = None
    num_experts = model.config.moe_experts
    for start in range(0, len(features), batch_size):
        batch = {k: v.to(model.device) for k, v in collator(features[start : start + batch_size]).items()}
        labels_B = batch.pop("labels")
        out = model(**batch)
        correct += int((out.logits.argmax(-1) == labels_B).sum())
        if out.expert_indices is not None:
            counts_LE = torch.stack([torch.bincount(idx[idx >= 0], minlength=num_experts) for idx in out.expert_indices])
            load_LE = counts_LE if load_LE is None else load_LE + counts_LE
    result: dict[str, Any] = {"accuracy": correct / len(features), "examples": len(features)}
    if load_LE is not None:
        result["expert_load"] = (load_LE.float() / load_LE.sum(1, keepdim=True).clamp(min=1)).tolist()
    return result


def save_selected_model(model, head_config, out_dir: str, exported_dir: str) -> None:
    """An exported folder with the fine-tuned encoder plus the head (xmoe.heads.save_with_head),
    which xmoe.heads.XMoEForSequenceClassification.from_pretrained loads."""
    from dataclasses import asdict

    from xmoe.heads import save_with_head

    head_state = {k: v for k, v in model.state_dict().items() if k.startswith("classifier.")}
    save_with_head(out_dir, exported_dir, model.encoder, head_state, asdict(head_config))


def make_trainer(model, training_args, train_features, collator, on_epoch_end, log):
    """A transformers.Trainer that also logs the task and balance losses (progress lines,
    tensorboard's train/task_loss and train/balance_loss) and calls on_epoch_end(epoch, means)."""
    from transformers import Trainer, TrainerCallback
    from transformers.trainer_callback import PrinterCallback

    class FinetuneTrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            outputs = model(**inputs)
            if model.training:
                # a dense encoder has no balance loss (None): it logs as 0
                values = tuple(0.0 if t is None else t.detach().item()
                               for t in (outputs.loss, outputs.task_loss, outputs.balance_loss))
                self.since_log.append(values)
                self.this_epoch.append(values)
            return (outputs.loss, outputs) if return_outputs else outputs.loss

        def log(self, logs, *args, **kwargs):
            if "loss" in logs and self.since_log:
                means = [sum(v) / len(self.since_log) for v in zip(*self.since_log)]
                logs.update(task_loss=means[1], balance_loss=means[2])
                steps_per_epoch = math.ceil(len(self.train_dataset) / self.args.per_device_train_batch_size)
                step, epochs = self.state.global_step, int(self.args.num_train_epochs)
                log(
                    f"epoch {(step - 1) // steps_per_epoch + 1}/{epochs} step {(step - 1) % steps_per_epoch + 1}/"
                    f"{steps_per_epoch}: loss {means[0]:.4f} (task {means[1]:.4f}, balance {means[2]:.4f}), "
                    f"lr {logs.get('learning_rate', 0.0):.2e}, {time.time() - self.started:.0f} s"
                )
                self.since_log.clear()
            super().log(logs, *args, **kwargs)

    class EpochEnd(TrainerCallback):
        def on_epoch_end(self, args, state, control, **kwargs):
            means = [sum(v) / len(trainer.this_epoch) for v in zip(*trainer.this_epoch)]
            trainer.this_epoch.clear()
            on_epoch_end(round(state.epoch), {"loss": means[0], "task_loss": means[1], "balance_loss": means[2]})
            trainer.model.train()

    trainer = FinetuneTrainer(
        model=model, args=training_args, train_dataset=train_features, data_collator=collator, callbacks=[EpochEnd()]
    )
    trainer.remove_callback(PrinterCallback)  # the progress lines above say it in words
    trainer.since_log, trainer.this_epoch, trainer.started = [], [], time.time()
    return trainer


def finetune(args: argparse.Namespace, log=print) -> dict[str, Any]:
    """Run the recipe; returns what metrics.json holds. Raises FinetuneError on bad input."""
    from transformers import DataCollatorWithPadding, TrainingArguments
    from transformers.utils import logging as transformers_logging

    from xmoe.heads import HeadConfig
    from xmoe.hf.modeling_xmoe import XMoEForSequenceClassification

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

    freeze = next(setting for flag, setting in FREEZE_SETTINGS.items() if getattr(args, flag))
    torch.manual_seed(args.seed)  # the new head's initialization
    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()  # its load report names the new head's weights: expected here
    transformers_logging.disable_progress_bar()
    try:
        model = XMoEForSequenceClassification.from_pretrained(
            args.model,
            num_labels=len(labels),
            id2label=dict(enumerate(labels)),
            label2id=label_ids,
            classifier_pooling=args.pooling,
            classifier_dropout=args.dropout,
            freeze_moe=freeze,
            balance_loss_weight=args.balance_loss_weight,
        )
        tokenizer = load_tokenizer(args.model, min(args.max_length, model.config.max_positions))
    except (OSError, ValueError) as error:
        raise FinetuneError(f"cannot load {args.model}: {error}") from None
    finally:
        transformers_logging.set_verbosity(verbosity)
        transformers_logging.enable_progress_bar()
    language_ids: dict[str, Optional[int]] = {}
    for language in [args.train_language] + [language for language, _, _ in eval_sets]:
        language_ids[language] = None
        if model.config.num_languages:
            known = model.config.languages
            if known is None or language not in known:
                message = f"unknown language {language!r}; the model knows {known}" if known else (
                    f"language {language!r} given by code, but this model has no language list")
                raise FinetuneError(message)
            language_ids[language] = known.index(language)
    head_config = HeadConfig(
        task="sequence_classification", num_labels=len(labels), labels=labels, pooling=args.pooling,
        dropout=args.dropout, freeze_routing=freeze != "none", freeze_experts=freeze == "router_and_experts",
        balance_loss_weight=args.balance_loss_weight,
    )
    os.makedirs(args.output_dir, exist_ok=True)  # only once the inputs are known to be good

    collator = DataCollatorWithPadding(tokenizer)
    train_features = make_features(tokenizer, train, label_ids, language_ids[args.train_language])
    valid_features = make_features(tokenizer, valid, label_ids, language_ids[args.train_language]) if valid else None
    steps_per_epoch = math.ceil(len(train) / args.batch_size)
    total_steps = steps_per_epoch * args.epochs
    training_args = TrainingArguments(
        output_dir=args.output_dir,  # save_strategy "no": Trainer writes nothing there itself
        num_train_epochs=args.epochs,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr,
        weight_decay=args.weight_decay,
        warmup_steps=int(args.warmup_ratio * total_steps),
        lr_scheduler_type="linear",
        max_grad_norm=args.clip_norm if args.clip_norm > 0 else 0.0,
        seed=args.seed,
        logging_steps=args.log_interval,
        save_strategy="no",  # the selected epoch is written to OUTPUT_DIR/best by on_epoch_end
        report_to="none",  # tensorboard: the callback below, writing to OUTPUT_DIR/tensorboard
        use_cpu=str(args.device).startswith("cpu"),
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    writer = None
    if not args.no_tensorboard:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(os.path.join(args.output_dir, "tensorboard"))
    trainable = [p for p in model.parameters() if p.requires_grad]
    frozen_moe = [n for n, p in model.named_parameters() if not p.requires_grad and (".ffn.router." in n or ".ffn.experts." in n)]
    log(
        f"fine-tuning {args.model} on {len(train)} examples of {args.train} ({args.train_language}), "
        f"{len(labels)} labels {labels}, {args.epochs} epochs x {steps_per_epoch} steps; "
        f"{sum(p.numel() for p in trainable):,} trainable parameters, {len(frozen_moe)} frozen MoE tensors"
    )

    history: list[dict[str, Any]] = []
    best = {"score": -1.0, "epoch": None, "state": None}
    best_dir = os.path.join(args.output_dir, "best")

    def on_epoch_end(epoch: int, means: dict[str, float]) -> None:
        record: dict[str, Any] = {"epoch": epoch, **{f"train_{k}": v for k, v in means.items()}}
        if valid_features is not None:
            record["valid_accuracy"] = evaluate(model, valid_features, collator, args.batch_size)["accuracy"]
            if writer is not None:
                writer.add_scalar("valid/accuracy", record["valid_accuracy"], epoch)
            log(f"epoch {epoch}: valid accuracy {record['valid_accuracy']:.4f}")
        history.append(record)
        # Model selection on the training language's dev set only (zero-shot: the other
        # languages are never looked at); without --valid the last epoch is kept.
        score = record.get("valid_accuracy", float(epoch))
        if score > best["score"]:
            best.update(score=score, epoch=epoch, state={k: v.detach().clone() for k, v in model.state_dict().items()})
            save_selected_model(model, head_config, best_dir, args.model)
            log(f"epoch {epoch}: saved {best_dir}")

    trainer = make_trainer(model, training_args, train_features, collator, on_epoch_end, log)
    if writer is not None:  # train/loss, train/task_loss, train/balance_loss, train/learning_rate, ...
        from transformers.integrations import TensorBoardCallback

        trainer.add_callback(TensorBoardCallback(tb_writer=writer))
    trainer.train()
    model.load_state_dict(best["state"])
    results = {
        language: evaluate(model, make_features(tokenizer, examples, label_ids, language_ids[language]), collator, args.batch_size)
        for language, _, examples in eval_sets
    }
    zero_shot = [r["accuracy"] for language, r in results.items() if language != args.train_language]
    metrics = {
        "model": os.path.abspath(args.model),
        "train": {"path": os.path.abspath(args.train), "language": args.train_language, "examples": len(train)},
        "labels": labels,
        "selection": f"best valid accuracy on {args.valid}" if valid is not None else "last epoch (no --valid)",
        "best_epoch": best["epoch"],
        "epochs": history,
        "accuracy": {language: r["accuracy"] for language, r in results.items()},
        "zero_shot_average": sum(zero_shot) / len(zero_shot) if zero_shot else None,
        "eval": {language: {"path": os.path.abspath(path), **results[language]} for language, path, _ in eval_sets},
        "options": {k: v for k, v in vars(args).items() if k != "eval"},
    }
    for language, result in results.items():
        log(f"{language}: accuracy {result['accuracy']:.4f} on {result['examples']} examples")
        if writer is not None:
            writer.add_scalar(f"eval/{language}_accuracy", result["accuracy"], best["epoch"])
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
