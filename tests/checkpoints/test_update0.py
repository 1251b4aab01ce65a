"""What the upcycled model computes at update 0: the MLM losses xmoe-upcycle --data reports, and
--moe-renormalize-gates, which keeps the dense function where the gate allows it."""

from __future__ import annotations

import re

import torch

from lifecycle.lifecycle_helpers import load
from xmoe.checkpoint import load_encoder
from xmoe.checkpoints.mlm_loss import build_task, masked_lm_losses
from xmoe.checkpoints.upcycle import main, upcycle


def _reported(printed: str) -> dict[str, float]:
    numbers = {}
    for label in ("dense model", "upcycled", "upcycled, renormalized gates, no capacity limit"):
        match = re.search(rf"^  {re.escape(label)} +(\d+\.\d+)", printed, re.M)
        assert match, printed
        numbers[label] = float(match.group(1))
    return numbers


def test_update0_report_gives_the_dense_and_the_upcycled_mlm_loss_on_the_same_batches(
    dense_checkpoint, toy_data, tmp_path, capsys
):
    out = tmp_path / "upcycled.pt"
    assert main([str(dense_checkpoint), str(out), "--data", str(toy_data), "--max-sentences", "64"]) == 0
    printed = capsys.readouterr().out
    assert re.search(r"MLM loss at update 0 on \S+ valid \(\d+ masked tokens", printed), printed
    reported = _reported(printed)
    # gate-scaled expert outputs and dropped tokens: not the dense function
    assert abs(reported["upcycled"] - reported["dense model"]) > 1e-3, printed
    assert re.search(r"mean gate of the chosen expert 0\.\d+, \d+\.\d% of tokens past capacity", printed)

    # Renormalized gates without a capacity limit: the dense model's loss, on every batch.
    dense, enc_cfg, _ = load_encoder(str(dense_checkpoint))
    preserving, _, _ = load_encoder(str(out))
    for layer in preserving.moe_layers():
        layer.renormalize_gates, layer.capacity_factor, layer.eval_capacity_factor = True, 0.0, 0.0
    task = build_task(str(toy_data), load(dense_checkpoint)["cfg"]["task"], enc_cfg.max_positions)
    losses = masked_lm_losses({"dense": dense, "preserving": preserving}, task, max_sentences=64)
    assert losses["dense"].masked_tokens == losses["preserving"].masked_tokens > 50
    assert abs(losses["dense"].loss - losses["preserving"].loss) < 1e-5
    assert abs(losses["dense"].loss - reported["upcycled, renormalized gates, no capacity limit"]) < 1e-4
    assert abs(losses["dense"].loss - reported["dense model"]) < 1e-4


def test_upcycled_with_renormalized_gates_and_no_capacity_limit_is_the_dense_model(dense_checkpoint, tmp_path):
    out = tmp_path / "upcycled.pt"
    result = upcycle(
        str(dense_checkpoint), str(out), {"moe_renormalize_gates": True, "moe_capacity_factor": 0.0}, expert_noise=0.0
    )
    assert load(out)["cfg"]["model"]["moe_renormalize_gates"] is True
    dense, _, _ = load_encoder(str(dense_checkpoint))
    moe, enc_cfg, _ = load_encoder(str(out))  # gates as the router gives them: no test hook
    assert enc_cfg.moe_renormalize_gates and result.moe_layers == [1, 3]
    tokens = torch.randint(4, enc_cfg.vocab_size, (4, 20), generator=torch.Generator().manual_seed(5))
    tokens[1, 15:] = 1
    real = tokens.ne(1)
    with torch.no_grad():
        torch.testing.assert_close(moe(tokens)[0][real], dense(tokens)[0][real], rtol=0, atol=1e-5)


def test_the_training_command_repeats_the_renormalize_option(dense_checkpoint, tmp_path, capsys):
    assert main([str(dense_checkpoint), str(tmp_path / "up.pt"), "--moe-renormalize-gates", "--moe-capacity-factor", "0"]) == 0
    printed = capsys.readouterr().out
    assert "--moe-capacity-factor 0.0 --moe-renormalize-gates --finetune-from-model" in printed
    assert "model.moe_capacity_factor=0.0 model.moe_renormalize_gates=true checkpoint.finetune_from_model=" in printed


def test_data_in_another_dictionary_is_refused_after_the_checkpoint_is_written(toy_data, tmp_path, capsys):
    from fairseq.data import Dictionary

    from .test_roberta import save_like_fairseq, tiny_roberta

    dictionary = Dictionary()
    for i in range(50):
        dictionary.add_symbol(f"w{i}")
    dictionary.add_symbol("<mask>")
    source = save_like_fairseq(tiny_roberta(dictionary), tmp_path / "roberta.pt")
    assert main([str(source), str(tmp_path / "up.pt"), "--moe-experts", "4", "--data", str(toy_data)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "binarize with the dense model's dictionary" in err[0], err
    assert re.search(r"its dictionary \(with <mask>\) has \d+ entries, the model 55", err[0]), err
    assert load(tmp_path / "up.pt")["upcycled_from"]["experts"] == 4  # written before the evaluation
