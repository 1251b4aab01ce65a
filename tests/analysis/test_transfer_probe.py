"""The frozen linear probe of `xmoe-analyze transfer --method probe` on features with a
language offset: per-language centring is what lets an English-trained head transfer."""

import numpy as np
import pytest

from xmoe.analysis.transfer import linear_probe

pytest.importorskip("sklearn")


def topic_features(rng: np.random.Generator, per_class: int, offset: float):
    """(2 * per_class, 4) features: the topic is the sign of column 0 (-1 or +1, small noise);
    columns 1-3 are noise; every row of the language shifted by `offset` along column 0."""
    labels = ["a"] * per_class + ["b"] * per_class
    X = rng.normal(scale=0.1, size=(2 * per_class, 4))
    X[:, 0] += np.where(np.array(labels) == "a", -1.0, 1.0) + offset
    return X, labels


def test_language_centring_turns_an_offset_language_from_chance_into_perfect_transfer():
    rng = np.random.default_rng(0)
    train_X, train_y = topic_features(rng, 20, offset=0.0)
    dev_X, dev_y = topic_features(rng, 10, offset=0.0)
    tests = {"en": topic_features(rng, 10, offset=0.0), "xx": topic_features(rng, 10, offset=5.0)}

    raw = linear_probe(train_X, train_y, dev_X, dev_y, tests, centring="none", seed=1)
    centred = linear_probe(train_X, train_y, dev_X, dev_y, tests, centring="language", seed=1)
    # Without centring the whole offset language lands on the "b" side: half right (chance).
    assert raw["accuracy"] == {"en": 1.0, "xx": 0.5}
    assert centred["accuracy"] == {"en": 1.0, "xx": 1.0}
    assert centred["C"] == 1.0 and centred["dev_accuracy_by_C"]["1.0"] == 1.0

    # Centred per language, any constant shift of a whole language (English train+dev together,
    # or one test language) leaves every prediction unchanged; without centring it does not.
    shift = rng.normal(scale=3.0, size=4)
    shifted = {"en": tests["en"], "xx": (tests["xx"][0] + shift, tests["xx"][1])}
    again = linear_probe(train_X - shift, train_y, dev_X - shift, dev_y, shifted, centring="language", seed=1)
    assert again["accuracy"] == centred["accuracy"]
    moved = linear_probe(train_X, train_y, dev_X, dev_y, {"xx": (tests["xx"][0] + [-5.0, 0, 0, 0], tests["xx"][1])},
                         centring="none", seed=1)
    assert moved["accuracy"] == {"xx": 1.0}  # undoing the offset by hand is what centring does


def test_an_unknown_centring_is_refused():
    rng = np.random.default_rng(0)
    X, y = topic_features(rng, 4, offset=0.0)
    with pytest.raises(ValueError, match="centring must be one of"):
        linear_probe(X, y, X, y, {"en": (X, y)}, centring="global", seed=1)
