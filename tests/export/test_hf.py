"""transformers' Auto classes load the exported folder (trust_remote_code=True) into models
whose hidden states and logits equal the fairseq model's."""

from __future__ import annotations

import pytest
import torch

from .conftest import load_auto as load
from .conftest import max_difference

transformers = pytest.importorskip("transformers")

# the session's tiny pre-trained model (data-prep + fairseq-train); one torch thread
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]


@pytest.fixture(scope="module")
def fairseq_outputs(fairseq_model, pretrained, texts_and_langs):
    from xmoe import hub

    model, _ = fairseq_model
    texts, langs = texts_and_langs
    batch = hub.load(str(pretrained.exported)).encode(texts, languages=langs)
    with torch.no_grad():
        features, extra = model(batch.src_tokens, src_langs=batch.src_langs, features_only=True,
                                return_all_hiddens=True)
        logits, _ = model(batch.src_tokens, src_langs=batch.src_langs)
    hidden_states = [h.transpose(0, 1) for h in extra["inner_states"]]
    return batch, features, hidden_states, logits


def test_auto_model_hidden_states_equal_the_fairseq_models(remote_code_cache, pretrained, fairseq_outputs):
    batch, features, hidden_states, _ = fairseq_outputs
    model = load(transformers.AutoModel, pretrained.exported)
    assert isinstance(model, transformers.PreTrainedModel) and not model.training
    assert type(model).__name__ == "XMoEModel" and model.config.hidden_size == 64
    with torch.no_grad():
        out = model(input_ids=batch.src_tokens, attention_mask=(~batch.padding_mask).long(),
                    language_ids=batch.src_langs, output_hidden_states=True)
    assert max_difference(out.last_hidden_state, features, batch.padding_mask) <= 1e-5
    assert len(out.hidden_states) == model.config.num_hidden_layers + 1 == len(hidden_states)
    for got, expected in zip(out.hidden_states, hidden_states):
        assert max_difference(got, expected, batch.padding_mask) <= 1e-5
    assert [idx.shape for idx in out.expert_indices] == [batch.src_tokens.shape] * 2  # MoE layers 1 and 3


def test_auto_model_for_masked_lm_logits_equal_the_fairseq_models(remote_code_cache, pretrained, fairseq_outputs):
    batch, _, _, logits = fairseq_outputs
    model = load(transformers.AutoModelForMaskedLM, pretrained.exported)
    encoder = model.encoder
    assert encoder.lm_head.weight is encoder.embed_tokens.weight  # tied, as in training
    with torch.no_grad():
        out = model(input_ids=batch.src_tokens, language_ids=batch.src_langs)
    assert max_difference(out.logits, logits, batch.padding_mask) <= 1e-5


def test_positions_of_a_tlm_pair_are_passed_through(remote_code_cache, pretrained, fairseq_model, texts_and_langs):
    from xmoe import hub

    model, _ = fairseq_model
    hub_model = hub.load(str(pretrained.exported))
    tokenizer = hub_model.tokenizer
    texts, _ = texts_and_langs
    source, target = tokenizer.encode(texts[0]), tokenizer.encode(texts[1])[1:]  # `<s> src </s> tgt </s>`
    tokens = torch.tensor([source + target])
    langs = torch.tensor([[0] * len(source) + [1] * len(target)])
    positions = torch.tensor([list(range(len(source))) + list(range(len(target)))])
    with torch.no_grad():
        expected, _ = model(tokens, src_langs=langs, src_positions=positions, features_only=True)
        out = load(transformers.AutoModel, pretrained.exported)(input_ids=tokens, language_ids=langs, position_ids=positions)
    assert float((out.last_hidden_state - expected).abs().max()) <= 1e-5


def test_language_ids_per_row_or_the_default_language_equal_per_token_rows(remote_code_cache, pretrained, fairseq_outputs):
    batch, _, _, _ = fairseq_outputs
    model = load(transformers.AutoModel, pretrained.exported)
    assert model.config.default_language == "en"

    def features(**inputs):
        with torch.no_grad():
            return model(input_ids=batch.src_tokens, **inputs).last_hidden_state

    per_token = features(language_ids=batch.src_langs)
    per_row = features(language_ids=batch.src_langs[:, 0])  # what collators make of a language_ids column
    assert max_difference(per_row, per_token, batch.padding_mask) == 0
    english = torch.zeros_like(batch.src_tokens)  # "en" is language 0 of the manifest
    assert max_difference(features(), features(language_ids=english), batch.padding_mask) == 0
    assert max_difference(features(), per_token, batch.padding_mask) > 1e-3  # the rows hold other languages too
    german = load(transformers.AutoModel, pretrained.exported)
    german.config.default_language = "de"
    with torch.no_grad():
        got = german(input_ids=batch.src_tokens).last_hidden_state
    assert max_difference(got, features(language_ids=torch.ones_like(batch.src_tokens)), batch.padding_mask) == 0


def test_ids_past_the_dictionary_read_as_unk(remote_code_cache, pretrained, fairseq_outputs):
    # tokenizer.json gives such ids to pieces dict.txt lacks; pre-training read those as <unk>
    batch, _, _, _ = fairseq_outputs
    model = load(transformers.AutoModel, pretrained.exported)
    past = batch.src_tokens.clone()
    past[:, 1] = model.config.vocab_size + 2
    unk = batch.src_tokens.clone()
    unk[:, 1] = model.config.unk_token_id
    with torch.no_grad():
        got = model(input_ids=past, language_ids=batch.src_langs).last_hidden_state
        expected = model(input_ids=unk, language_ids=batch.src_langs).last_hidden_state
    assert max_difference(got, expected, batch.padding_mask) == 0
