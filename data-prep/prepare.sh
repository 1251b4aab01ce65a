#!/usr/bin/env bash
# Corpus -> binarized data in three steps (and a benchmark), each skipped when its output is complete:
#   1. fetch_libreoffice.py  LibreOffice help packages -> RAW   (skipped when RAW holds data,
#                                                                so a RAW you bring is used as is)
#   2. train_spm.py          RAW -> SPM/spm.model + SPM/dict.txt
#   3. binarize.py           RAW + SPM -> DATA (fairseq mmap datasets + manifest.json)
#   4. build_topic_task.py   the cached help packages -> TOPIC, the zero-shot topic classification
#                            task of `xmoe-analyze transfer` (only when the packages are cached)
# Every writer publishes its folder with a rename at the end, so "exists" means "complete".
set -euo pipefail

usage() {
    cat <<'EOF'
usage: data-prep/prepare.sh [options]

Build the demo data end to end (about a minute on 2 cores, network for apt only in step 1).

options (environment variable in brackets):
  --cache DIR          working folder [XMOE_CACHE] (default: cache/ in the repository); holds
                       libreoffice/ (downloaded packages) and the default folders below
  --raw DIR            RAW corpus folder [XMOE_RAW] (default: CACHE/raw)
  --spm DIR            sentencepiece model folder [XMOE_SPM] (default: CACHE/spm)
  --data DIR           binarized data folder [XMOE_DATA] (default: CACHE/data-bin)
  --topic DIR          topic classification task folder [XMOE_TOPIC] (default: CACHE/topic)
  --langs "en de ..."  languages, in language-id order [XMOE_LANGS]
                       (default: "en de fr es ru zh-cn")
  --vocab-size N       sentencepiece vocabulary [XMOE_VOCAB_SIZE] (default: 8000)
  --workers N          processes for parsing and encoding [XMOE_WORKERS] (default: nproc)
  --spm-model FILE --dict FILE
                       use an existing model and dictionary (e.g. XLM-R's) instead of training
  --force              redo every step, replacing existing outputs
  --fetch-args "..."   extra arguments for fetch_libreoffice.py [FETCH_ARGS]
  --spm-args "..."     extra arguments for train_spm.py [SPM_ARGS]
  --binarize-args "..." extra arguments for binarize.py [BINARIZE_ARGS]
  --python PY          interpreter [PYTHON] (default: the repository's .venv if any, else python3)
  -h, --help           this text

example:
  data-prep/prepare.sh --langs "en de zh-cn" --vocab-size 4000 --binarize-args "--workers 1"
EOF
}

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"

cache="${XMOE_CACHE:-$repo/cache}"
raw="${XMOE_RAW:-}"
spm_dir="${XMOE_SPM:-}"
data="${XMOE_DATA:-}"
topic="${XMOE_TOPIC:-}"
langs="${XMOE_LANGS:-en de fr es ru zh-cn}"
vocab_size="${XMOE_VOCAB_SIZE:-8000}"
workers="${XMOE_WORKERS:-$(nproc 2>/dev/null || echo 1)}"
fetch_args="${FETCH_ARGS:-}"
spm_args="${SPM_ARGS:-}"
binarize_args="${BINARIZE_ARGS:-}"
python="${PYTHON:-}"
spm_model=""
dict_file=""
force=""

need_value() {  # an option that takes a value must get one
    if [[ $# -lt 2 ]]; then
        echo "prepare.sh: error: $1 needs a value (see --help)" >&2
        exit 2
    fi
}
while [[ $# -gt 0 ]]; do
    case "$1" in
        --cache) need_value "$@"; cache="$2"; shift 2 ;;
        --raw) need_value "$@"; raw="$2"; shift 2 ;;
        --spm) need_value "$@"; spm_dir="$2"; shift 2 ;;
        --data) need_value "$@"; data="$2"; shift 2 ;;
        --topic) need_value "$@"; topic="$2"; shift 2 ;;
        --langs) need_value "$@"; langs="$2"; shift 2 ;;
        --vocab-size) need_value "$@"; vocab_size="$2"; shift 2 ;;
        --workers) need_value "$@"; workers="$2"; shift 2 ;;
        --spm-model) need_value "$@"; spm_model="$2"; shift 2 ;;
        --dict) need_value "$@"; dict_file="$2"; shift 2 ;;
        --force) force="--force"; shift ;;
        --fetch-args) need_value "$@"; fetch_args="$2"; shift 2 ;;
        --spm-args) need_value "$@"; spm_args="$2"; shift 2 ;;
        --binarize-args) need_value "$@"; binarize_args="$2"; shift 2 ;;
        --python) need_value "$@"; python="$2"; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "prepare.sh: error: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done

raw="${raw:-$cache/raw}"
spm_dir="${spm_dir:-$cache/spm}"
data="${data:-$cache/data-bin}"
topic="${topic:-$cache/topic}"
if [[ -z "$python" ]]; then
    python=python3
    [[ -x "$repo/.venv/bin/python" ]] && python="$repo/.venv/bin/python"
fi
if [[ -n "$spm_model" || -n "$dict_file" ]] && [[ -z "$spm_model" || -z "$dict_file" ]]; then
    echo "prepare.sh: error: --spm-model and --dict go together" >&2
    exit 2
fi

# Word splitting of the pass-through strings and of --langs is intended: they are argument lists.
read -r -a fetch_extra <<<"$fetch_args"
read -r -a spm_extra <<<"$spm_args"
read -r -a binarize_extra <<<"$binarize_args"
read -r -a lang_list <<<"$langs"

run() {
    echo "+ $*" >&2
    "$@"
}
holds_data() {  # a folder with at least one visible entry
    [[ -d "$1" ]] && [[ -n "$(ls -A "$1" 2>/dev/null | grep -v '^\.' || true)" ]]
}
started=$SECONDS

echo "== 1/4 corpus: $raw" >&2
if [[ -z "$force" ]] && holds_data "$raw"; then
    echo "skip: $raw already holds a RAW corpus (--force to rebuild it)" >&2
else
    run "$python" "$here/fetch_libreoffice.py" --cache-dir "$cache/libreoffice" --out "$raw" \
        --langs "${lang_list[@]}" --workers "$workers" $force "${fetch_extra[@]}"
fi

echo "== 2/4 sentencepiece: $spm_dir" >&2
if [[ -z "$force" && -f "$spm_dir/spm.model" && -f "$spm_dir/dict.txt" ]]; then
    echo "skip: $spm_dir already holds spm.model and dict.txt (--force to redo)" >&2
elif [[ -n "$spm_model" ]]; then
    run "$python" "$here/train_spm.py" --spm-model "$spm_model" --dict "$dict_file" \
        --out "$spm_dir" $force "${spm_extra[@]}"
else
    run "$python" "$here/train_spm.py" --raw "$raw" --out "$spm_dir" --langs "${lang_list[@]}" \
        --vocab-size "$vocab_size" --threads "$workers" $force "${spm_extra[@]}"
fi

echo "== 3/4 binarize: $data" >&2
if [[ -z "$force" && -f "$data/manifest.json" ]]; then
    echo "skip: $data already holds manifest.json (--force to redo)" >&2
else
    run "$python" "$here/binarize.py" --raw "$raw" --spm-model "$spm_dir/spm.model" \
        --dict "$spm_dir/dict.txt" --out "$data" --langs "${lang_list[@]}" \
        --workers "$workers" $force "${binarize_extra[@]}"
fi

echo "== 4/4 topic classification task: $topic" >&2
if [[ -z "$force" && -f "$topic/manifest.json" ]]; then
    echo "skip: $topic already holds manifest.json (--force to redo)" >&2
elif [[ ! -d "$cache/libreoffice/unpacked" ]]; then
    echo "skip: no LibreOffice help packages in $cache/libreoffice (the RAW corpus was brought), so no topic task" >&2
else
    run "$python" "$here/build_topic_task.py" --offline --cache-dir "$cache/libreoffice" --out "$topic" \
        --langs "${lang_list[@]}" --workers "$workers" $force
fi
echo "done in $((SECONDS - started))s: $data" >&2
