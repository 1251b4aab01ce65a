"""A standard transformers tokenizer (`PreTrainedTokenizerFast`, saved as tokenizer.json) that
gives exactly the ids pre-training gave, built locally from the sentencepiece model and the
fairseq dict.txt (no hub download).

Pre-training ids come from two tables (xmoe/tokenizer.py): sentencepiece segments a line into
pieces, and the fairseq dictionary maps pieces to ids: `<s> <pad> </s> <unk>` = 0..3, then the
dict.txt entries in file order, then `<mask>` appended by the task; a piece dict.txt lacks reads
as `<unk>`. data-prep's dict.txt lists the model's pieces in model order (XLM-R's convention),
so ids are the sentencepiece ids shifted by one, but nothing here relies on that: the
tokenizer.json vocabulary is laid out in dictionary order, each piece with its sentencepiece
score and type, so segmentation follows the sentencepiece model and ids follow the dictionary.

Pieces of the sentencepiece model that dict.txt lacks cannot share `<unk>`'s id in a
tokenizer.json vocabulary (one id per entry), yet leaving them out would change the
segmentation. They are appended after `<mask>`, at ids >= vocab_size, and the exported models
read every id >= vocab_size as `<unk>`, as pre-training did. data-prep's dictionaries lack no
piece, so their tokenizers have exactly vocab_size ids.

Layout (`post_processor`): one text `<s> a </s>`; a pair `<s> a </s> b </s>`, the layout of two
consecutive sentences of a pre-training block, which is also how xmoe-finetune encodes pairs
(not XLM-R's `<s> a </s></s> b </s>`). `<mask>` strips the space before it, like XLM-R's, so
"Hello <mask>." masks the piece "▁world" of "Hello world.".
"""

from __future__ import annotations

import re
from typing import Any, Optional

from xmoe.tokenizer import BOS, EOS, MASK, PAD, UNK, FairseqVocabulary

FAST_TOKENIZER_FILE = "tokenizer.json"

# sentencepiece_model.proto's piece types
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
EMITTED_TYPES = (NORMAL, USER_DEFINED, BYTE)  # what SentencePieceProcessor.encode can return


def read_spm_proto(spm_model_path: str):
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    with open(spm_model_path, "rb") as f:
        proto.ParseFromString(f.read())
    return proto


def dictionary_ordered_proto(spm_model_path: str, vocab: FairseqVocabulary):
    """(a copy of the sentencepiece model whose i-th piece is dictionary id i, with the model's
    score and type; pieces the dictionary lacks appended at the end; how many of those).
    Dictionary entries that are not pieces the model can emit (fairseq's specials and `<mask>`:
    CONTROL; madeupword padding: UNUSED) get the lowest piece score, so that they neither lower
    the unknown-piece penalty (computed from the lowest score) nor win a segmentation."""
    proto = read_spm_proto(spm_model_path)
    by_piece = {p.piece: p for p in proto.pieces if p.type in EMITTED_TYPES}
    if proto.trainer_spec.model_type not in (1, 2):  # UNIGRAM, BPE
        raise ValueError(f"{spm_model_path}: only unigram and BPE sentencepiece models are supported")
    lowest = min((p.score for p in by_piece.values() if p.type == NORMAL), default=0.0)
    specials = {vocab.bos, vocab.pad, vocab.eos, vocab.mask}
    missing = [p.piece for p in proto.pieces if p.type in EMITTED_TYPES and p.piece not in vocab.indices]

    result = read_spm_proto(spm_model_path)
    del result.pieces[:]
    for index, symbol in enumerate(vocab.symbols + missing):
        entry, piece = result.pieces.add(), by_piece.get(symbol)
        entry.piece = symbol
        if index == vocab.unk:
            entry.type, entry.score = UNKNOWN, 0.0
        elif index in specials:
            entry.type, entry.score = CONTROL, lowest
        elif piece is None:  # madeupword padding, or a symbol the model never emits
            entry.type, entry.score = UNUSED, lowest
        else:
            entry.type, entry.score = piece.type, piece.score
    result.trainer_spec.unk_id = vocab.unk
    result.trainer_spec.unk_piece = UNK
    return result, len(missing)


def text_around_mask_steps(proto):
    """(normalizer, pre-tokenizer) that cut the text like sentencepiece also around `<mask>`.

    The tokenizer normalizes each stretch of text between special tokens on its own. Within a
    stretch: the model's character map, runs of spaces made one, trailing spaces dropped, spaces
    written "▁". The first stretch gets sentencepiece's dummy "▁" prefix unless it starts with a
    space (a leading space is the prefix: sentencepiece strips it and adds one); later stretches
    keep exactly the space they start with. So "Hello <mask> world." gives `▁Hello <mask> ▁world .`
    and "Hello <mask>." gives `▁Hello <mask> .`: the masked piece carried the word's space, the
    pieces after it are those of pre-training."""
    from tokenizers import Regex, normalizers, pre_tokenizers

    steps = []
    if proto.normalizer_spec.precompiled_charsmap:
        steps.append(normalizers.Precompiled(proto.normalizer_spec.precompiled_charsmap))
    # Only spaces count: sentencepiece leaves other whitespace (newlines) to the character map.
    steps += [normalizers.Replace(Regex(" {2,}"), " "), normalizers.Replace(Regex(r" +\z"), ""), normalizers.Replace(" ", "▁")]
    pre_tokenizer = [pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)]
    user_defined = [p.piece for p in proto.pieces if p.type == USER_DEFINED]
    if user_defined:  # emitted whole, never merged: isolate them
        pattern = "|".join(re.escape(piece) for piece in sorted(user_defined, key=len, reverse=True))
        pre_tokenizer.append(pre_tokenizers.Split(Regex(pattern), behavior="isolated"))
    return normalizers.Sequence(steps), pre_tokenizers.Sequence(pre_tokenizer)


def build_fast_tokenizer(
    spm_model_path: str, dict_path: str, model_max_length: Optional[int] = None, **init_kwargs: Any
):
    """A PreTrainedTokenizerFast encoding like pre-training (module docstring). init_kwargs go
    to its constructor (and so into tokenizer_config.json)."""
    from tokenizers import AddedToken, processors
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import SpmConverter

    vocab = FairseqVocabulary(dict_path)
    proto, _ = dictionary_ordered_proto(spm_model_path, vocab)
    pieces = [(p.piece, p.score) for p in proto.pieces]
    if proto.trainer_spec.model_type == 1:
        model_vocab: Any = pieces
    else:  # BPE: {piece: id}; a repeated (overwritten) symbol keeps its last id, as in fairseq
        model_vocab = {piece: index for index, (piece, _) in enumerate(pieces)}
    backend = SpmConverter.build_tokenizer_from_spm_proto(proto, model_vocab, legacy=False)
    if backend is None:
        raise ValueError(f"{spm_model_path}: cannot build a tokenizers model from this sentencepiece model")
    spec = proto.normalizer_spec
    if spec.add_dummy_prefix and spec.remove_extra_whitespaces and spec.escape_whitespaces:
        backend.normalizer, backend.pre_tokenizer = text_around_mask_steps(proto)
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}",
        pair=f"{BOS} $A {EOS} $B {EOS}",
        special_tokens=[(BOS, vocab.bos), (EOS, vocab.eos)],
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        pad_token=PAD,
        cls_token=BOS,
        sep_token=EOS,
        mask_token=AddedToken(MASK, lstrip=True, rstrip=False, normalized=False, special=True),
        model_max_length=model_max_length if model_max_length is not None else int(1e30),
        model_input_names=["input_ids", "attention_mask"],
        padding_side="right",
        truncation_side="right",
        **init_kwargs,
    )
    ids = [tokenizer.convert_tokens_to_ids(t) for t in (BOS, PAD, EOS, UNK, MASK)]
    if ids != [vocab.bos, vocab.pad, vocab.eos, vocab.unk, vocab.mask]:
        raise ValueError(f"{dict_path}: special tokens got ids {ids}, the dictionary gives "
                         f"{[vocab.bos, vocab.pad, vocab.eos, vocab.unk, vocab.mask]}")
    return tokenizer
