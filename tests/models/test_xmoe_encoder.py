"""The xmoe_encoder model in-process: architectures, MoE placement, inputs and outputs."""

import dataclasses
from types import SimpleNamespace

import fairseq  # noqa: F401  (xmoe registers its fairseq components only once fairseq is loaded)
import pytest
import torch
from fairseq.data import Dictionary
from fairseq.models import ARCH_MODEL_REGISTRY

import xmoe.criterions  # noqa: F401
import xmoe.models  # noqa: F401
from xmoe.moe import MoELayer
from xmoe.models.xmoe_encoder import (
    ARCHITECTURES,
    XMoEEncoderConfig,
    XMoEEncoderModel,
    apply_architecture,
    moe_layer_indices,
)


def make_task(num_words: int = 20) -> SimpleNamespace:
    dictionary = Dictionary()
    for i in range(num_words):
        dictionary.add_symbol(f"w{i}")
    return SimpleNamespace(source_dictionary=dictionary, dictionary=dictionary)


def build(arch: str = "xmoe_tiny", **overrides) -> XMoEEncoderModel:
    cfg = XMoEEncoderConfig(dropout=0.0, attention_dropout=0.0, **overrides)
    apply_architecture(cfg, arch)
    torch.manual_seed(0)
    return XMoEEncoderModel.build_model(cfg, make_task())


def random_batch(model: XMoEEncoderModel, batch: int = 3, length: int = 7) -> torch.Tensor:
    vocab = model.embed_tokens.num_embeddings
    generator = torch.Generator().manual_seed(1)
    return torch.randint(4, vocab, (batch, length), generator=generator)  # no special symbols


def test_every_architecture_is_registered_with_fairseq():
    for arch in ARCHITECTURES:
        assert ARCH_MODEL_REGISTRY[arch] is XMoEEncoderModel


@pytest.mark.parametrize(
    "arch, layers, moe_layers",
    [
        ("xmoe_tiny", 4, [1, 3]),
        ("xmoe_base", 12, [1, 3, 5, 7, 9, 11]),
        ("xmoe_base_paper", 12, [5]),
        ("xmoe_large", 24, list(range(1, 24, 2))),
        ("dense_base", 12, []),
    ],
)
def test_architecture_places_moe_layers(arch, layers, moe_layers):
    cfg = XMoEEncoderConfig()
    apply_architecture(cfg, arch)
    assert cfg.encoder_layers == layers
    assert moe_layer_indices(cfg) == moe_layers


def test_xmoe_base_has_paper_sizes():
    cfg = XMoEEncoderConfig()
    apply_architecture(cfg, "xmoe_base")
    assert (cfg.encoder_embed_dim, cfg.encoder_ffn_embed_dim, cfg.encoder_attention_heads, cfg.moe_experts) == (
        768, 3072, 12, 32)


def test_architecture_keeps_options_the_user_set():
    cfg = XMoEEncoderConfig(encoder_layers=6, moe_experts=8, moe_freq=3)
    apply_architecture(cfg, "xmoe_tiny")
    assert (cfg.encoder_layers, cfg.moe_experts, cfg.moe_freq, cfg.encoder_embed_dim) == (6, 8, 3, 64)


def test_moe_layers_list_takes_precedence_over_freq():
    model = build(moe_layers="0,2", moe_freq=2)
    assert model.moe_layer_indices == [0, 2]
    assert [layer.is_moe for layer in model.layers] == [True, False, True, False]


def test_moe_layers_outside_the_encoder_are_rejected():
    with pytest.raises(ValueError, match="outside"):
        build(moe_layers="4")


def test_dense_architecture_has_no_moe_layer():
    model = build("dense_tiny")
    assert model.moe_layer_indices == []
    assert not any(isinstance(m, MoELayer) for m in model.modules())
    assert not any(hasattr(p, "expert") for p in model.parameters())


def test_exactly_the_expert_weights_carry_the_expert_flag():
    model = build("xmoe_tiny")
    moe_layers = [m for m in model.modules() if isinstance(m, MoELayer)]
    assert len(moe_layers) == 2
    expert_params = {id(p) for moe in moe_layers for p in moe.experts.parameters()}
    for name, param in model.named_parameters():
        assert hasattr(param, "expert") == (id(param) in expert_params), name
    # Routers are shared by all workers: they must be all-reduced like dense weights.
    assert not any(hasattr(p, "expert") for moe in moe_layers for p in moe.router.parameters())


def test_forward_shapes_and_extra_outputs():
    model = build("xmoe_tiny").eval()
    tokens = random_batch(model)
    logits, extra = model(tokens, return_all_hiddens=True)
    vocab = model.embed_tokens.num_embeddings
    assert logits.shape == (3, 7, vocab)
    assert len(extra["moe_aux"]) == 2
    assert all(torch.isfinite(a.balance_loss) for a in extra["moe_aux"])
    assert len(extra["inner_states"]) == 5 and extra["inner_states"][0].shape == (7, 3, 64)  # (T, B, C)

    masked = torch.zeros_like(tokens, dtype=torch.bool)
    masked[0, 1] = masked[2, 4] = True
    masked_logits, _ = model(tokens, masked_tokens=masked)
    assert masked_logits.shape == (2, vocab)
    torch.testing.assert_close(masked_logits, logits[masked])

    features, _ = model(tokens, features_only=True)
    assert features.shape == (3, 7, 64)


def test_mlm_head_is_tied_to_token_embeddings():
    model = build("xmoe_tiny")
    assert model.lm_head.weight is model.embed_tokens.weight


def test_mlm_output_bias_starts_at_zero_or_at_the_log_unigram_prior():
    assert torch.equal(build("xmoe_tiny").lm_head.bias, torch.zeros(24))  # 4 specials + 20 words
    task = make_task(num_words=0)
    for word, count in (("a", 7), ("b", 1), ("c", 0)):
        task.source_dictionary.add_symbol(word, n=count)
    cfg = XMoEEncoderConfig(lm_bias_init="unigram")
    apply_architecture(cfg, "xmoe_tiny")
    model = XMoEEncoderModel.build_model(cfg, task)
    # fairseq's 4 special symbols have count 1 each; add-one smoothing: counts + 1 = 2,2,2,2,8,2,1 (sum 19)
    expected = torch.tensor([2, 2, 2, 2, 8, 2, 1], dtype=torch.float64).div(19).log().float()
    assert torch.allclose(model.lm_head.bias.detach(), expected)
    assert model.lm_head.weight is model.embed_tokens.weight  # still tied


def test_padding_does_not_change_real_token_outputs():
    model = build("xmoe_tiny").eval()
    tokens = random_batch(model, batch=2, length=6)
    pad = model.padding_idx
    padded = torch.cat([tokens, torch.full((2, 3), pad)], dim=1)  # right padding, as fairseq batches
    logits, extra = model(tokens)
    padded_logits, padded_extra = model(padded)
    torch.testing.assert_close(padded_logits[:, :6], logits, atol=1e-5, rtol=1e-5)
    for aux in padded_extra["moe_aux"]:
        assert (aux.expert_index[:, 6:] == -1).all()  # padding is never routed


def test_default_positions_count_real_tokens_and_can_be_given_explicitly():
    model = build("xmoe_tiny").eval()
    tokens = random_batch(model, batch=2, length=5)
    positions = torch.arange(5).expand(2, 5)
    torch.testing.assert_close(model(tokens)[0], model(tokens, src_positions=positions)[0])
    restarted = torch.tensor([[0, 1, 2, 0, 1]] * 2)  # TLM restarts positions at the target segment
    assert not torch.allclose(model(tokens)[0], model(tokens, src_positions=restarted)[0])


def test_language_embeddings_are_used_when_configured():
    model = build("xmoe_tiny", num_languages=3).eval()
    tokens = random_batch(model, batch=2, length=5)
    with torch.no_grad():
        model.encoder.embed_languages.weight.normal_()
    english, german = torch.zeros_like(tokens), torch.ones_like(tokens)
    assert not torch.allclose(model(tokens, src_langs=english)[0], model(tokens, src_langs=german)[0])
    # Without src_langs (fairseq's masked_lm task) the model still runs.
    assert model(tokens)[0].shape[:2] == (2, 5)


def test_language_embeddings_are_off_by_default():
    assert build("xmoe_tiny").encoder.embed_languages is None


def test_pre_layernorm_option_adds_final_layernorm_and_trains():
    model = build("xmoe_tiny", encoder_normalize_before=True)
    assert model.encoder.final_layer_norm is not None
    tokens = random_batch(model)
    logits, extra = model(tokens)
    loss = logits.logsumexp(-1).mean() + sum(a.balance_loss for a in extra["moe_aux"])
    loss.backward()
    assert model.embed_tokens.weight.grad is not None
    assert all(p.grad is not None for p in model.layers[1].ffn.router.parameters())


def test_router_init_is_left_to_the_moe_layer():
    # The BERT-style init of dense weights must not overwrite the X-MoE router's own init.
    model = build("xmoe_tiny")
    router = model.layers[1].ffn.router
    assert torch.allclose(router.tau, torch.tensor(0.07))
    # Orthogonal expert embeddings (gain 0.32): pairwise orthogonal rows.
    gram = router.expert_embeddings @ router.expert_embeddings.t()
    torch.testing.assert_close(gram - torch.diag(gram.diag()), torch.zeros_like(gram), atol=1e-5, rtol=0)


@pytest.mark.parametrize("gate, top_k", [("switch", 1), ("switch_sigmoid", 1), ("gshard", 2), ("xmoe_torchscale", 1)])
def test_baseline_gates_build_and_run(gate, top_k):
    model = build("xmoe_tiny", moe_gate=gate, moe_top_k=top_k)
    logits, extra = model(random_batch(model))
    assert torch.isfinite(logits).all() and len(extra["moe_aux"]) == 2


def test_every_option_has_help_text():
    for f in dataclasses.fields(XMoEEncoderConfig):
        if not f.name.startswith("_"):  # fairseq's internal _name
            assert f.metadata.get("help"), f"{f.name} has no --help text"


def test_show_options_lists_every_option_with_the_arch_presets():
    from xmoe.models.show_options import format_options

    text = " ".join(format_options("xmoe_base_paper").split())  # undo line wrapping
    for f in dataclasses.fields(XMoEEncoderConfig):
        if f.name.startswith("_"):
            continue
        assert "--" + f.name.replace("_", "-") in text, f.name
    assert "--balance-loss-weight" in text
    assert "unset: the --arch value (default: 5)" in text  # moe_layers preset of xmoe_base_paper


@pytest.mark.gpu
def test_forward_and_backward_on_cuda_match_cpu():
    model = build("xmoe_tiny").eval()
    tokens = random_batch(model)
    cpu_logits, _ = model(tokens)
    cuda_model = model.cuda()
    cuda_logits, extra = cuda_model(tokens.cuda())
    torch.testing.assert_close(cuda_logits.cpu(), cpu_logits, atol=1e-4, rtol=1e-4)
    (cuda_logits.logsumexp(-1).mean() + sum(a.balance_loss for a in extra["moe_aux"])).backward()
    assert all(p.grad is not None for p in cuda_model.layers[1].ffn.experts.parameters())


def test_language_table_smaller_than_the_tasks_languages_is_rejected():
    task = make_task()
    task.num_languages = 3
    cfg = XMoEEncoderConfig(num_languages=2)
    apply_architecture(cfg, "xmoe_tiny")
    with pytest.raises(ValueError, match="--num-languages 2"):
        XMoEEncoderModel.build_model(cfg, task)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_model_in_half_precision_keeps_routers_fp32_and_trains_every_parameter(dtype, device):
    # fairseq's --fp16 / --bf16 trainers (plain and memory-efficient) cast the whole model down.
    model = build().to(device).to(dtype)
    routers = {id(p) for p in model.router_parameters()}
    assert len(routers) == 6  # W, expert embeddings, tau of 2 MoE layers
    for name, param in model.named_parameters():
        assert param.dtype == (torch.float32 if id(param) in routers else dtype), name
    logits, extra = model(random_batch(model).to(device))
    assert logits.dtype == dtype and all(a.balance_loss.dtype == torch.float32 for a in extra["moe_aux"])
    (logits.float().logsumexp(-1).mean() + sum(a.balance_loss for a in extra["moe_aux"])).backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and param.grad.dtype == param.dtype, name
        assert torch.isfinite(param.grad.float()).all(), name


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_model_under_cpu_autocast_routes_in_fp32(dtype):
    # fairseq's --amp autocasts on CUDA only; CPU autocast exercises the same casts here.
    model = build()
    with torch.autocast("cpu", dtype=dtype):
        logits, extra = model(random_batch(model))
    assert all(a.balance_loss.dtype == torch.float32 for a in extra["moe_aux"])
    (logits.float().logsumexp(-1).mean() + sum(a.balance_loss for a in extra["moe_aux"])).backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and param.grad.dtype == torch.float32, name
        assert torch.isfinite(param.grad).all(), name
