"""TokenMasker: how many tokens are selected, how they are corrupted, what is never touched."""

import fairseq  # noqa: F401  (import order: fairseq before xmoe)
import numpy as np
import pytest
import torch

from xmoe.data.masking import TokenMasker, word_start_table

BOS, PAD, EOS, UNK, MASK = 0, 1, 2, 3, 99
REGULAR = np.arange(4, 99)  # ids 4..98 are ordinary pieces


def make_masker(**options) -> TokenMasker:
    return TokenMasker(
        mask_idx=MASK, pad_idx=PAD, never_mask=[BOS, PAD, EOS, UNK, MASK],
        random_token_ids=REGULAR, **options,
    )


def random_sample(rng: np.random.Generator, length: int) -> torch.Tensor:
    body = rng.integers(4, 99, size=length)
    return torch.tensor([BOS, *body, EOS], dtype=torch.long)


def test_masking_selects_15_percent_and_corrupts_80_10_10_on_a_large_draw():
    masker = make_masker()
    rng = np.random.default_rng(0)
    maskable = selected = to_mask = to_random = kept = 0
    for _ in range(3000):
        tokens = random_sample(rng, int(rng.integers(5, 60)))
        source, target = masker(tokens, rng)
        chosen = target != PAD
        maskable += len(tokens) - 2
        selected += int(chosen.sum())
        to_mask += int((source[chosen] == MASK).sum())
        kept += int((source[chosen] == tokens[chosen]).sum())
        to_random += int(((source[chosen] != MASK) & (source[chosen] != tokens[chosen])).sum())
        # the target holds the original id wherever something was selected
        assert torch.equal(target[chosen], tokens[chosen])
    assert selected / maskable == pytest.approx(0.15, abs=0.005)
    assert to_mask / selected == pytest.approx(0.8, abs=0.015)
    # a random replacement hits the original id with probability 1/95: it then counts as kept
    assert kept / selected == pytest.approx(0.1 + 0.1 / 95, abs=0.012)
    assert to_random / selected == pytest.approx(0.1 - 0.1 / 95, abs=0.012)


def test_special_tokens_are_never_selected_or_changed():
    masker = make_masker(mask_prob=0.5)
    rng = np.random.default_rng(1)
    specials = torch.tensor([BOS, EOS, UNK, PAD])
    for _ in range(300):
        tokens = torch.cat([random_sample(rng, 8), torch.tensor([UNK, EOS, UNK])])
        source, target = masker(tokens, rng)
        is_special = torch.isin(tokens, specials)
        assert (target[is_special] == PAD).all()
        assert torch.equal(source[is_special], tokens[is_special])


def test_random_replacements_come_from_the_regular_vocabulary():
    masker = make_masker(mask_prob=0.5, leave_unmasked_prob=0.0, random_token_prob=1.0)
    rng = np.random.default_rng(2)
    tokens = random_sample(rng, 2000)
    source, target = masker(tokens, rng)
    replaced = source[target != PAD]
    assert len(replaced) > 900
    assert np.isin(replaced.numpy(), REGULAR).all()


def test_whole_word_masking_selects_every_piece_of_a_word_or_none():
    symbols = ["<s>", "<pad>", "</s>", "<unk>"] + [
        ("\u2581w" if (i - 4) % 3 == 0 else "c") + str(i) for i in range(4, 99)
    ] + ["<mask>"]
    starts = word_start_table(symbols, num_special=4)
    assert starts[:4].all() and starts[4] and not starts[5] and not starts[6]
    masker = make_masker(word_starts=starts)
    rng = np.random.default_rng(3)
    selected_words = total_words = 0
    for _ in range(500):
        tokens = random_sample(rng, 30)
        tokens[1] = 4  # make the first piece begin a word
        _, target = masker(tokens, rng)
        chosen = (target != PAD).numpy()
        word_of = np.cumsum(starts[tokens.numpy()])
        for word in np.unique(word_of[1:-1]):
            in_word = word_of == word
            in_word[[0, -1]] = False
            assert chosen[in_word].all() or not chosen[in_word].any()
            selected_words += int(chosen[in_word].all())
            total_words += 1
    assert selected_words / total_words == pytest.approx(0.15, abs=0.015)


def test_same_generator_seed_gives_the_same_mask():
    masker = make_masker()
    tokens = random_sample(np.random.default_rng(4), 100)
    first = masker(tokens, np.random.default_rng([7, 1, 5]))
    again = masker(tokens, np.random.default_rng([7, 1, 5]))
    other = masker(tokens, np.random.default_rng([7, 2, 5]))
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(first[1], other[1])


@pytest.mark.parametrize(
    "options, message",
    [
        ({"mask_prob": 0.0}, "--mask-prob"),
        ({"mask_prob": 1.5}, "--mask-prob"),
        ({"leave_unmasked_prob": -0.1}, "--leave-unmasked-prob"),
        ({"random_token_prob": 1.2}, "--random-token-prob"),
        ({"leave_unmasked_prob": 0.6, "random_token_prob": 0.6}, "must not exceed 1"),
    ],
)
def test_invalid_probabilities_are_rejected_naming_the_option(options, message):
    with pytest.raises(ValueError, match=message):
        make_masker(**options)
