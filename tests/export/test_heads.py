"""Fine-tuning heads: what freeze_experts / freeze_routing keep bit-identical, what the balance
loss does with a frozen router, pooling and padding, saving next to an exported model."""

from __future__ import annotations

import pytest
import torch

from xmoe.encoder import EncoderConfig, XMoEEncoder
from xmoe.heads import HeadConfig, XMoEForSequenceClassification, XMoEForTokenClassification

PAD = 1


def tiny_encoder(seed: int = 0) -> XMoEEncoder:
    torch.manual_seed(seed)
    cfg = EncoderConfig(vocab_size=40, padding_idx=PAD, encoder_layers=3, encoder_embed_dim=16,
                        encoder_ffn_embed_dim=32, encoder_attention_heads=2, moe_layer_indices=[1],
                        moe_experts=4, moe_routing_dim=2, max_positions=16, dropout=0.0, attention_dropout=0.0,
                        moe_capacity_factor=0)  # dropless: every token reaches its expert
    return XMoEEncoder(cfg)


def toy_batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(4, 40, (6, 9), generator=generator)
    tokens[:, 0] = 0
    tokens[3, 6:] = PAD  # a padded row
    labels = torch.randint(0, 3, (6,), generator=generator)
    return tokens, labels


def router_and_expert_parameters(model) -> tuple[dict, dict]:
    named = dict(model.named_parameters())
    routers = {k: v for k, v in named.items() if ".ffn.router." in k}
    experts = {k: v for k, v in named.items() if ".ffn.experts." in k}
    assert routers and experts
    return routers, experts


def train_a_few_steps(model, steps: int = 3) -> dict[str, torch.Tensor]:
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    tokens, labels = toy_batch()
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        optimizer.zero_grad()
        model(tokens, labels=labels).loss.backward()
        optimizer.step()
    return before


def is_mlm_head_own(name: str) -> bool:
    # the MLM head's dense/LayerNorm/bias are unused by fine-tuning (its projection is the embedding)
    return name.startswith("encoder.lm_head.")


def test_freeze_experts_keeps_routers_and_experts_bit_identical_while_the_rest_trains():
    model = XMoEForSequenceClassification.build(tiny_encoder(), num_labels=3, freeze_experts=True)
    before = train_a_few_steps(model)
    routers, experts = router_and_expert_parameters(model)
    for name, param in {**routers, **experts}.items():
        assert torch.equal(param, before[name]), name
    others = [n for n, _ in model.named_parameters() if n not in routers and n not in experts and not is_mlm_head_own(n)]
    for name in others:
        assert not torch.equal(dict(model.named_parameters())[name], before[name]), f"{name} did not train"


def test_freeze_routing_keeps_only_the_routers_bit_identical():
    model = XMoEForSequenceClassification.build(tiny_encoder(), num_labels=3, freeze_routing=True)
    before = train_a_few_steps(model)
    routers, experts = router_and_expert_parameters(model)
    for name, param in routers.items():
        assert torch.equal(param, before[name]), name
    for name, param in experts.items():
        assert not torch.equal(param, before[name]), f"{name} did not train"


def test_without_freezing_routers_train_too():
    model = XMoEForSequenceClassification.build(tiny_encoder(), num_labels=3)
    before = train_a_few_steps(model)
    routers, _ = router_and_expert_parameters(model)
    assert not torch.equal(routers["encoder.layers.1.ffn.router.expert_embeddings"],
                           before["encoder.layers.1.ffn.router.expert_embeddings"])


def test_balance_loss_with_a_frozen_router_reaches_the_layers_below_it_only():
    model = XMoEForSequenceClassification.build(tiny_encoder(), num_labels=3, freeze_experts=True)
    tokens, _ = toy_batch()
    out = model(tokens)
    assert out.loss is None and out.balance_loss > 0
    out.balance_loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    # below the MoE layer (embeddings, layer 0, layer 1's attention): moved by the balance loss
    assert grads["encoder.layers.0.self_attn.qkv_proj.weight"].abs().sum() > 0
    assert grads["encoder.embed_positions.weight"].abs().sum() > 0
    # above it, and the head: untouched by the balance loss
    assert grads["encoder.layers.2.self_attn.qkv_proj.weight"] is None
    assert grads["classifier.out_proj.weight"] is None


def test_loss_is_task_loss_plus_weighted_balance_loss_and_routing_is_reported():
    tokens, labels = toy_batch()
    weighted = XMoEForSequenceClassification.build(tiny_encoder(), num_labels=3, balance_loss_weight=0.5).eval()
    out = weighted(tokens, labels=labels)
    assert torch.allclose(out.loss, out.task_loss + 0.5 * out.balance_loss)
    fractions = out.routing["expert_fraction"]
    assert fractions.shape == (1, 4) and torch.allclose(fractions.sum(), torch.tensor(1.0))
    assert out.routing["expert_index"][0].shape == tokens.shape
    assert (out.routing["expert_index"][0][tokens.eq(PAD)] == -1).all()
    unweighted = XMoEForSequenceClassification.build(tiny_encoder(), num_labels=3, balance_loss_weight=0.0).eval()
    out = unweighted(tokens, labels=labels)
    assert torch.equal(out.loss, out.task_loss) and out.balance_loss > 0  # still reported


def test_mean_pooling_ignores_padding():
    model = XMoEForSequenceClassification.build(tiny_encoder(), num_labels=2, pooling="mean", dropout=0.0).eval()
    tokens, _ = toy_batch()
    padded_row = model(tokens).logits[3]
    alone = model(tokens[3:4, :6]).logits[0]
    assert torch.allclose(padded_row, alone, atol=1e-5)


def test_token_classification_ignores_padding_labels():
    model = XMoEForTokenClassification.build(tiny_encoder(), num_labels=5).eval()
    tokens, _ = toy_batch()
    labels = torch.randint(0, 5, tokens.shape, generator=torch.Generator().manual_seed(0))
    out = model(tokens, labels=labels)
    assert out.logits.shape == (6, 9, 5)
    relabelled = labels.clone()
    relabelled[tokens.eq(PAD)] = 4 - relabelled[tokens.eq(PAD)]  # labels under padding do not count
    assert torch.equal(model(tokens, labels=relabelled).task_loss, out.task_loss)


def test_unknown_pooling_is_refused():
    with pytest.raises(ValueError, match="pooling must be one of"):
        XMoEForSequenceClassification(tiny_encoder(), HeadConfig("sequence_classification", 2, pooling="max"))


@pytest.mark.slow  # the session's pre-trained model
def test_saved_head_reloads_from_the_exported_folder(pretrained, tmp_path):
    model = XMoEForSequenceClassification.from_pretrained(str(pretrained.exported), num_labels=3,
                                                          labels=["a", "b", "c"], freeze_experts=True)
    assert not model.training and model.config.freeze_experts
    train_a_few_steps(model, steps=1)
    model.eval()
    model.save(str(tmp_path / "best"), str(pretrained.exported))
    reloaded = XMoEForSequenceClassification.from_pretrained(str(tmp_path / "best"))
    assert reloaded.config == model.config
    batch = model.tokenizer.batch(["the table.", "die Zelle und der Wert."], languages=["en", "de"])
    assert torch.equal(reloaded(**batch.model_inputs()).logits, model(**batch.model_inputs()).logits)
    with pytest.raises(ValueError, match="describes a 'sequence_classification' head"):
        XMoEForTokenClassification.from_pretrained(str(tmp_path / "best"))
