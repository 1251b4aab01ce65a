"""xmoe.hub.load (torch only) gives the fairseq model's hidden states, and says what is wrong
with a damaged folder."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from xmoe import hub

from .conftest import max_difference

pytestmark = pytest.mark.slow  # the session's tiny pre-trained model (data-prep + fairseq-train)


@pytest.fixture(scope="module")
def hub_model(pretrained):
    return hub.load(str(pretrained.exported))


def test_every_layers_hidden_states_equal_the_fairseq_models(hub_model, fairseq_model, texts_and_langs):
    model, _ = fairseq_model
    texts, langs = texts_and_langs
    batch = hub_model.encode(texts, languages=langs)
    assert batch.padding_mask.any()  # rows of different lengths: padding is part of the check
    with torch.no_grad():
        features, extra = model(batch.src_tokens, src_langs=batch.src_langs, features_only=True,
                                return_all_hiddens=True)
    assert max_difference(hub_model.features(batch), features, batch.padding_mask) <= 1e-5
    for layer, state_TBC in enumerate(extra["inner_states"]):
        got = hub_model.features(batch, layer=layer)
        assert max_difference(got, state_TBC.transpose(0, 1), batch.padding_mask) <= 1e-5, layer
    assert not hub_model.encoder.training


def test_texts_go_through_the_pretraining_tokenizer(hub_model, pretrained, texts_and_langs):
    from xmoe.tokenizer import XMoETokenizer

    texts, langs = texts_and_langs
    reference = XMoETokenizer(str(pretrained.data / "spm.model"), str(pretrained.data / "dict.txt"),
                              languages=["en", "de", "zh-cn"])
    expected = reference.batch(texts, langs)
    got = hub_model.encode(texts, languages=langs)
    assert torch.equal(got.src_tokens, expected.src_tokens) and torch.equal(got.src_langs, expected.src_langs)
    assert hub_model.languages == ["en", "de", "zh-cn"]


def test_token_tensor_input_and_mean_pooling_over_real_tokens(hub_model, texts_and_langs):
    texts, langs = texts_and_langs
    batch = hub_model.encode(texts, languages=langs)
    from_ids = hub_model.features(batch.src_tokens, languages=langs)
    assert torch.equal(from_ids, hub_model.features(batch))
    pooled = hub_model.sentence_embeddings(batch, layer=2)
    hidden = hub_model.features(batch, layer=2)
    for row, length in enumerate(batch.lengths.tolist()):
        assert torch.allclose(pooled[row], hidden[row, :length].mean(0), atol=1e-6)
    assert torch.equal(hub_model.sentence_embeddings(batch, pooling="first"), hub_model.features(batch)[:, 0])


def test_dropless_eval_makes_a_sentences_features_independent_of_its_batch(pretrained, texts_and_langs):
    texts, langs = texts_and_langs
    model = hub.load(str(pretrained.exported), eval_capacity_factor=0)
    batch = model.encode(texts, languages=langs)
    together = model.features(batch)
    for row, (text, lang) in enumerate(zip(texts, langs)):
        alone = model.features([text], languages=lang)[0]
        length = int(batch.lengths[row])
        assert torch.allclose(together[row, :length], alone, atol=1e-5), text


# ---- damaged folders ------------------------------------------------------------------------------
@pytest.fixture
def damaged(pretrained, tmp_path):
    folder = tmp_path / "exported"
    shutil.copytree(pretrained.exported, folder)
    return folder


def test_missing_weight_is_named(damaged):
    weights = load_file(str(damaged / "model.safetensors"))
    del weights["encoder.layers.3.ffn.router.tau"]
    save_file(weights, str(damaged / "model.safetensors"))
    with pytest.raises(ValueError, match=r"missing 1 \(layers.3.ffn.router.tau\), unexpected none"):
        hub.load(str(damaged))


def test_config_that_does_not_fit_the_weights(damaged):
    config = json.loads((damaged / "config.json").read_text())
    config["moe_experts"] = 8
    (damaged / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"shapes do not fit config.json: 10 \(encoder.layers.1.ffn.experts.b1_EF "
                                         r"\(4, 128\) \(config.json: \(8, 128\)\)"):
        hub.load(str(damaged))


def test_config_of_another_model_type(damaged):
    config = json.loads((damaged / "config.json").read_text())
    config["model_type"] = "bert"
    (damaged / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="model_type is 'bert', not 'xmoe'"):
        hub.load(str(damaged))


def test_export_from_before_a_field_existed_loads_with_that_fields_old_behaviour(damaged, hub_model, texts_and_langs):
    config = json.loads((damaged / "config.json").read_text())
    for name in hub.ADDED_AFTER_FIRST_EXPORT:
        del config[name]
    (damaged / "config.json").write_text(json.dumps(config))
    old = hub.load(str(damaged))
    assert old.encoder.cfg.moe_renormalize_gates is False
    texts, langs = texts_and_langs
    batch = hub_model.encode(texts, languages=langs)
    assert torch.equal(old.features(batch), hub_model.features(batch))


def test_export_lacking_an_architecture_field_is_refused(damaged):
    config = json.loads((damaged / "config.json").read_text())
    del config["encoder_layers"]
    (damaged / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"lacks the encoder fields \['encoder_layers'\]"):
        hub.load(str(damaged))


def test_dictionary_that_does_not_fit_the_config(damaged):
    with open(damaged / "dict.txt", "a", encoding="utf-8") as f:
        f.write("\u2581extra 1\n")
    with pytest.raises(ValueError, match="the dictionary gives 303 ids but config.json says vocab_size 302"):
        hub.load(str(damaged))


def test_folder_without_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json is missing"):
        hub.load(str(tmp_path))


def test_hub_needs_neither_fairseq_nor_transformers(pretrained):
    import subprocess
    import sys

    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, *args):\n"
        "        if name.split('.')[0] in ('fairseq', 'transformers'):\n"
        "            raise ImportError(f'{name} is blocked')\n"
        "sys.meta_path.insert(0, Block())\n"
        "from xmoe import hub\n"
        f"model = hub.load({str(pretrained.exported)!r})\n"
        "print(tuple(model.features(['the table.'], languages='en').shape))\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip().startswith("(1, ") and run.stdout.strip().endswith(", 64)")
