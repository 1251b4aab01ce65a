#!/usr/bin/env bash
# The main job, end to end on a fresh machine (about 8 minutes on 2 idle CPU cores once installed):
#   1. install what is missing (scripts/install.sh, idempotent);
#   2. prepare the real multilingual corpus: the LibreOffice help pages in en de fr es ru zh-cn,
#      monolingual text and aligned en-X pairs (data-prep/prepare.sh; cached under cache/);
#   3. pre-train a small X-MoE encoder (xmoe_tiny at width 128, MLM + TLM) to update MAX_UPDATE/2, stop;
#   4. resume from the checkpoint to MAX_UPDATE (a second fairseq-train run on the same folder);
#   5. print validation perplexity per language and per language pair;
#   6. export the model (safetensors + sentencepiece + modeling code, scripts/export.sh);
#   7. print cross-lingual retrieval accuracy per language pair on held-out test pairs and
#      zero-shot topic accuracy per language (centred linear probe trained on English), each beside its baselines.
# Environment: XMOE_WORK_DIR (default work-dirs/main_job), MAX_UPDATE (default 2000),
# XMOE_CACHE (downloads and prepared data, default cache/), XMOE_DATA (a binarized corpus to use
# instead of preparing one, default CACHE/data-bin),
# XMOE_TOPIC (the topic task, default CACHE/topic), XMOE_VENV.
# Extra arguments go to both fairseq-train runs.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$(realpath -m "${XMOE_VENV:-$REPO_ROOT/.venv}")"
WORK_DIR="$(realpath -m "${XMOE_WORK_DIR:-$REPO_ROOT/work-dirs/main_job}")"
MAX_UPDATE="${MAX_UPDATE:-2000}"
CACHE="$(realpath -m "${XMOE_CACHE:-$REPO_ROOT/cache}")"
DATA="$(realpath -m "${XMOE_DATA:-$CACHE/data-bin}")"

say() { echo "[main_job] $*"; }
run() { say "\$ $*"; "$@"; }

"$REPO_ROOT/scripts/install.sh"
PY="$VENV/bin/python"
mkdir -p "$WORK_DIR"
cd "$REPO_ROOT"

if [[ ! -f "$DATA/manifest.json" ]]; then
    run "$REPO_ROOT/data-prep/prepare.sh" --cache "$CACHE" --data "$DATA"
fi
# The recipe that learns (docs/results.md, "Why training destroyed the retrieval signal"):
# width 128; no language embeddings; three TLM batches per MLM batch; no dropout; the MLM output
# bias starts at the log unigram prior, so the tied embeddings of rare pieces keep their identity.
# fairseq validates at every checkpoint save (every 400 updates here); the perplexities printed
# at the end come from the last validation, at MAX_UPDATE.
train() {  # $1 = --max-update of this leg; fairseq resumes from SAVE_DIR/checkpoint_last.pt if present
    run "$VENV/bin/fairseq-train" "$DATA" --user-dir "$REPO_ROOT/xmoe" \
        --task xmoe_mlm_tlm --criterion xmoe_masked_lm --arch xmoe_tiny \
        --encoder-embed-dim 128 --encoder-ffn-embed-dim 512 --num-languages 0 \
        --dropout 0 --attention-dropout 0 --lm-bias-init unigram \
        --mlm-tlm-ratio 1:3 --tokens-per-sample 128 \
        --cpu --num-workers 0 --seed 1 --batch-size 32 \
        --optimizer adam --adam-betas '(0.9,0.98)' --lr 1e-3 --clip-norm 1.0 \
        --lr-scheduler polynomial_decay --warmup-updates 100 --total-num-update "$MAX_UPDATE" \
        --max-update "$1" --save-dir "$WORK_DIR/checkpoints" --save-interval-updates 400 \
        --keep-interval-updates 2 --no-epoch-checkpoints \
        --validate-interval 1000 --data-buffer-size 0 \
        --log-interval 50 --log-file "$WORK_DIR/train.log" \
        --tensorboard-logdir "$WORK_DIR/tensorboard" "${@:2}"
}

say "leg 1: pre-train xmoe_tiny (width 128) on $DATA to update $((MAX_UPDATE / 2))"
train $((MAX_UPDATE / 2)) "$@"
say "leg 2: resume from $WORK_DIR/checkpoints/checkpoint_last.pt and train to update $MAX_UPDATE"
train "$MAX_UPDATE" "$@"

"$PY" - "$WORK_DIR/train.log" "$DATA/manifest.json" <<'PYEOF'
import json, re, sys
# fairseq's last validation line: "epoch 001 | valid on 'valid' subset | loss ... | ppl_en 12.3 | ..."
last = None
for line in open(sys.argv[1], encoding="utf-8", errors="replace"):
    if "| valid on '" in line:
        last = line
if last is None:
    sys.exit("[main_job] no validation line in the training log")
fields = dict(re.findall(r"\| (\S+) ([0-9.eE+-]+)(?= \||$)", last.strip()))
groups = {k[len("ppl_"):]: v for k, v in fields.items() if k.startswith("ppl_") and k not in ("ppl_mlm", "ppl_tlm")}
print(f"[main_job] validation perplexity at update {fields.get('num_updates', '?')}: all {fields.get('ppl', '?')}")
pairs = set(json.load(open(sys.argv[2]))["pairs"])  # e.g. "en-zh-cn"; a language like "zh-cn" is not one
for group in sorted(groups, key=lambda g: (g in pairs, g)):
    print(f"    {group:<10} {float(groups[group]):10.2f}")
PYEOF

run "$REPO_ROOT/scripts/export.sh" "$WORK_DIR/checkpoints/checkpoint_last.pt" "$WORK_DIR/exported" \
    --data "$DATA" --force
# Evaluation: every number beside its baselines (the same config at random init, seed 0, and a
# TF-IDF bag of the same sentencepiece pieces), on held-out data (docs/analysis.md).
say "cross-lingual retrieval on the held-out test pairs (model | random init | TF-IDF)"
run "$PY" -m xmoe.analysis.cli retrieval "$WORK_DIR/checkpoints/checkpoint_last.pt" \
    --data "$DATA" --split test --out "$WORK_DIR/retrieval"
# Zero-shot topic classification of LibreOffice help pages: fine-tuned on English, tested on
# every language; built from the cached help packages (data-prep/build_topic_task.py).
TOPIC="$(realpath -m "${XMOE_TOPIC:-$CACHE/topic}")"
if [[ ! -f "$TOPIC/manifest.json" && -d "$CACHE/libreoffice/unpacked" ]]; then
    LANGS="$("$PY" -c 'import json,sys; print(" ".join(json.load(open(sys.argv[1]))["languages"]))' "$DATA/manifest.json")"
    # shellcheck disable=SC2086  # LANGS is a list of language codes
    run "$PY" "$REPO_ROOT/data-prep/build_topic_task.py" --cache-dir "$CACHE/libreoffice" --out "$TOPIC" --langs $LANGS
fi
if [[ -f "$TOPIC/manifest.json" ]]; then
    # A frozen linear probe with per-language centring (docs/results.md: a head fine-tuned on English
    # features of these small encoders lands in the wrong region for the other languages); about a
    # minute of CPU for all test pages.
    say "zero-shot topic classification, centred linear probe (model | random init | TF-IDF + logistic regression | majority)"
    run "$PY" -m xmoe.analysis.cli transfer "$WORK_DIR/exported" --topic-data "$TOPIC" \
        --method probe --out "$WORK_DIR/transfer"
else
    say "no topic task: $CACHE/libreoffice holds no help packages (a corpus of your own);" \
        "set XMOE_TOPIC to a folder written by data-prep/build_topic_task.py"
fi
say "done: logs $WORK_DIR/train.log, tensorboard $WORK_DIR/tensorboard, export $WORK_DIR/exported," \
    "retrieval $WORK_DIR/retrieval/retrieval.json, topic transfer $WORK_DIR/transfer/transfer.json"
