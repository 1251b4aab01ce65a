"""The export with transformers' own clients: pipelines, Trainer, data collators and the task
Auto classes (built on xmoe.heads.layers, with frozen routing and the balance loss)."""

from __future__ import annotations

import random

import pytest
import torch

from data_prep.dataprep_helpers import LANGS, make_sentence

from .conftest import load_auto

transformers = pytest.importorskip("transformers")

# the session's tiny pre-trained model (data-prep + fairseq-train); one torch thread
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]


@pytest.fixture(scope="module")
def tokenizer(pretrained):
    return transformers.AutoTokenizer.from_pretrained(str(pretrained.exported), trust_remote_code=True)


def parameters(model) -> dict[str, torch.Tensor]:
    return {name: param.detach().clone() for name, param in model.named_parameters()}


def moe_names(model) -> tuple[list[str], list[str]]:
    names = [name for name, _ in model.named_parameters()]
    return [n for n in names if ".ffn.router." in n], [n for n in names if ".ffn.experts." in n]


def train_arguments(out_dir, **overrides):
    settings = dict(output_dir=str(out_dir), num_train_epochs=1, per_device_train_batch_size=8, learning_rate=1e-3,
                    warmup_steps=0, logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, seed=1,
                    dataloader_num_workers=0, disable_tqdm=True)
    return transformers.TrainingArguments(**{**settings, **overrides})


# ---- task Auto classes ---------------------------------------------------------------------------
def test_sequence_classifier_freezes_router_and_experts_by_default_and_equals_the_xmoe_head(
    remote_code_cache, pretrained, tokenizer
):
    from xmoe.heads import XMoEForSequenceClassification as TorchHead

    model = load_auto(transformers.AutoModelForSequenceClassification, pretrained.exported, num_labels=3).eval()
    routers, experts = moe_names(model)
    trainable = {name for name, param in model.named_parameters() if param.requires_grad}
    assert routers and experts and not trainable & set(routers + experts)
    assert {"classifier.dense.weight", "classifier.out_proj.weight", "encoder.embed_tokens.weight"} <= trainable
    assert 0.01 < float(model.classifier.dense.weight.std()) < 0.03  # BERT init (std 0.02), not left empty

    # The same head of xmoe.heads with the same weights gives the same logits and losses.
    torch_head = TorchHead.from_pretrained(str(pretrained.exported), num_labels=3, freeze_experts=True)
    torch_head.load_state_dict(model.state_dict(), strict=False)
    inputs = tokenizer(["die Zelle und der Wert.", "the table cell."], ["Zelle.", "the chart."], padding=True,
                       return_tensors="pt")
    labels = torch.tensor([0, 2])
    with torch.no_grad():
        out = model(**inputs, labels=labels)
        expected = torch_head.eval()(inputs["input_ids"], src_langs=torch.zeros_like(inputs["input_ids"]), labels=labels)
    assert torch.allclose(out.logits, expected.logits, atol=1e-6)
    assert torch.allclose(out.balance_loss, expected.balance_loss) and out.balance_loss > 0
    assert torch.allclose(out.loss, out.task_loss + 0.01 * out.balance_loss)  # the documented weight


def test_freeze_moe_and_balance_loss_weight_are_set_through_from_pretrained(remote_code_cache, pretrained, tokenizer):
    auto = transformers.AutoModelForSequenceClassification
    router_only = load_auto(auto, pretrained.exported, num_labels=2, freeze_moe="router", balance_loss_weight=0.5)
    routers, experts = moe_names(router_only)
    grads = {name: param.requires_grad for name, param in router_only.named_parameters()}
    assert not any(grads[n] for n in routers) and all(grads[n] for n in experts)
    inputs = tokenizer(["die Zelle.", "the table cell chart."], padding=True, return_tensors="pt")
    out = router_only.eval()(**inputs, labels=torch.tensor([0, 1]))
    assert torch.allclose(out.loss, out.task_loss + 0.5 * out.balance_loss)

    everything = load_auto(auto, pretrained.exported, num_labels=2, freeze_moe=False)
    assert all(p.requires_grad for n, p in everything.named_parameters() if n in routers + experts)
    with pytest.raises(ValueError, match="freeze_moe must be one of"):
        load_auto(auto, pretrained.exported, num_labels=2, freeze_moe="experts_only")


def test_token_classifier_ignores_padding_and_unlabelled_pieces(remote_code_cache, pretrained, tokenizer):
    model = load_auto(transformers.AutoModelForTokenClassification, pretrained.exported, num_labels=5).eval()
    assert all(not p.requires_grad for n, p in model.named_parameters() if ".ffn.experts." in n)
    inputs = tokenizer(["die Zelle und der Wert.", "the table."], padding=True, return_tensors="pt")
    labels = torch.randint(0, 5, inputs["input_ids"].shape, generator=torch.Generator().manual_seed(0))
    labels[0, 0] = -100
    with torch.no_grad():
        out = model(**inputs, labels=labels)
        relabelled = labels.clone()
        padding = inputs["attention_mask"].eq(0)
        assert padding.any()
        relabelled[padding] = (relabelled[padding] + 1) % 5
        again = model(**inputs, labels=relabelled)
    assert out.logits.shape == (*inputs["input_ids"].shape, 5)
    assert torch.equal(out.task_loss, again.task_loss)
    keep = labels.ne(-100) & ~padding
    expected = torch.nn.functional.cross_entropy(out.logits[keep], labels[keep])
    assert torch.allclose(out.task_loss, expected, atol=1e-6)


# ---- pipelines ---------------------------------------------------------------------------------
def test_fill_mask_pipeline_top_prediction_is_the_fairseq_models_argmax(
    remote_code_cache, pretrained, tokenizer, fairseq_model
):
    model = load_auto(transformers.AutoModelForMaskedLM, pretrained.exported)
    fill = transformers.pipeline("fill-mask", model=model, tokenizer=tokenizer, top_k=3)
    fairseq, _ = fairseq_model
    for text in ["Die Zelle <mask> der Wert.", "the table <mask> chart page.", "的一是<mask>不了有和人这。"]:
        ids = tokenizer(text, return_tensors="pt")["input_ids"]
        position = int((ids[0] == tokenizer.mask_token_id).nonzero())
        with torch.no_grad():  # the pipeline's model runs with the default language, "en" = 0
            logits, _ = fairseq(ids, src_langs=torch.zeros_like(ids))
        predictions = fill(text)
        assert predictions[0]["token"] == int(logits[0, position].argmax())
        assert predictions[0]["score"] == pytest.approx(float(logits[0, position].softmax(-1).max()), rel=1e-4)


def test_feature_extraction_pipeline_equals_hub_features(remote_code_cache, pretrained, tokenizer):
    from xmoe import hub

    model = load_auto(transformers.AutoModel, pretrained.exported)
    extract = transformers.pipeline("feature-extraction", model=model, tokenizer=tokenizer)
    hub_model = hub.load(str(pretrained.exported))
    for text, language in [("the table cell chart.", "en"), ("中文的一是在不了。", "zh-cn")]:
        got = torch.tensor(extract(text))[0]  # (T, C)
        expected = hub_model.features([text], languages="en")[0]  # pipelines use the default language
        assert got.shape == expected.shape
        assert float((got - expected).abs().max()) <= 1e-5
        if language != "en":  # the default is a choice: the text's own language gives other features
            assert float((got - hub_model.features([text], languages=language)[0]).abs().max()) > 1e-4


# ---- Trainer and the data collators --------------------------------------------------------------
def test_trainer_with_padding_collator_fine_tunes_a_sequence_classifier(
    remote_code_cache, pretrained, tokenizer, tmp_path
):
    from xmoe.finetune import read_tsv

    # A small TSV (label<TAB>text): is the sentence English or German?
    rng = random.Random(10)
    rows = [f"{lang}\t{make_sentence(lang, rng)}" for lang in rng.choices(["en", "de"], k=48)]
    (tmp_path / "train.tsv").write_text("label\ttext\n" + "\n".join(rows) + "\n", encoding="utf-8")
    examples = read_tsv(str(tmp_path / "train.tsv"))  # xmoe-finetune's TSV checks
    labels = sorted({e.label for e in examples})
    features = [
        {**tokenizer(e.text_a, truncation=True, max_length=64), "labels": labels.index(e.label),
         "language_ids": LANGS.index(e.label)}
        for e in examples
    ]
    collator = transformers.DataCollatorWithPadding(tokenizer)
    batch = collator(features[:8])
    assert batch["language_ids"].tolist() == [f["language_ids"] for f in features[:8]]  # passed through, (B,)

    torch.manual_seed(1)
    model = load_auto(transformers.AutoModelForSequenceClassification, pretrained.exported, num_labels=len(labels))
    before = parameters(model)

    def mean_task_loss() -> float:
        model.eval()
        with torch.no_grad():
            return sum(float(model(**collator(features[i : i + 16])).task_loss) for i in range(0, 48, 16)) / 3

    loss_before = mean_task_loss()
    trainer = transformers.Trainer(model=model, args=train_arguments(tmp_path / "run", learning_rate=3e-3, lr_scheduler_type="constant"),
                                   train_dataset=features, data_collator=collator)
    result = trainer.train()
    assert result.global_step == 6  # one epoch of 48 examples in batches of 8
    assert mean_task_loss() < loss_before - 0.01  # measured: 0.693 -> 0.664
    predictions = trainer.predict(features)  # the logits alone, routing details left out
    assert predictions.predictions.shape == (48, len(labels)) and predictions.metrics["test_loss"] > 0
    after = parameters(model)
    routers, experts = moe_names(model)
    assert all(torch.equal(after[n], before[n]) for n in routers + experts)  # frozen by default
    assert not torch.equal(after["classifier.out_proj.weight"], before["classifier.out_proj.weight"])
    assert not torch.equal(after["encoder.layers.0.self_attn.qkv_proj.weight"], before["encoder.layers.0.self_attn.qkv_proj.weight"])


def test_language_modeling_collator_continues_mlm_training(remote_code_cache, pretrained, tokenizer, tmp_path):
    raw = pretrained.raw
    lines = [line for lang in LANGS for line in (raw / "mono" / f"{lang}.valid.txt").read_text(encoding="utf-8").splitlines()[:16]]
    features = [tokenizer(line, truncation=True, max_length=64) for line in lines]
    collator = transformers.DataCollatorForLanguageModeling(tokenizer, mlm_probability=0.15)
    torch.manual_seed(0)
    fixed_batch = collator(features)
    masked = fixed_batch["input_ids"].eq(tokenizer.mask_token_id)
    assert masked.any() and (fixed_batch["labels"][fixed_batch["labels"].ne(-100)] < len(tokenizer)).all()

    model = load_auto(transformers.AutoModelForMaskedLM, pretrained.exported)
    assert all(p.requires_grad for n, p in model.named_parameters() if ".ffn.router." in n)  # nothing frozen

    def mlm_loss() -> float:
        model.eval()
        with torch.no_grad():
            return float(model(**fixed_batch).task_loss)

    loss_before = mlm_loss()
    before = parameters(model)
    trainer = transformers.Trainer(model=model, args=train_arguments(tmp_path / "mlm", num_train_epochs=3),
                                   train_dataset=features, data_collator=collator)
    trainer.train()
    assert mlm_loss() < loss_before
    router = "encoder.layers.1.ffn.router.expert_embeddings"
    assert not torch.equal(parameters(model)[router], before[router])  # continued pre-training moves routers
    logged = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(logged) == trainer.state.global_step and all(value > 0 for value in logged)
