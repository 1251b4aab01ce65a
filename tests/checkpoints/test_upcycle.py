"""xmoe-upcycle on this project's dense checkpoints: what the experts, routers and the rest start
as, what the upcycled model computes, the command's messages, and training on from the result
with fairseq-train (one process, and expert-parallel on two)."""

from __future__ import annotations

import math
import re
from dataclasses import replace

import pytest
import torch

from lifecycle.lifecycle_helpers import RECORD_LOADED_STATE, load, losses, num_updates, torchrun_command
from xmoe.checkpoint import load_encoder
from xmoe.checkpoints.upcycle import main, upcycle
from xmoe.encoder import XMoEEncoder


def _dense_ffn_tensors(dense: XMoEEncoder, layer: int) -> dict[str, torch.Tensor]:
    """The dense FFN in StackedExperts' layout (w1 (C, F), b1 (F), w2 (F, C), b2 (C))."""
    ffn = dense.layers[layer].ffn
    return {"w1_EDF": ffn.fc1.weight.t(), "b1_EF": ffn.fc1.bias, "w2_EFD": ffn.fc2.weight.t(), "b2_ED": ffn.fc2.bias}


def fix_gates_to_one(encoder: XMoEEncoder) -> None:
    """Every MoE layer: the router still chooses the expert, but its gate value is 1, and no token
    is dropped (dropless capacity)."""
    for moe in encoder.moe_layers():
        route = moe.router.forward
        moe.router.forward = lambda x, route=route: replace(route(x), gates_TK=torch.ones_like(route(x).gates_TK))
        moe.capacity_factor = moe.eval_capacity_factor = 0.0


def _tokens(vocab_size: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(4, vocab_size, (3, 17), generator=generator)
    tokens[0, 12:] = 1  # padding
    return tokens


def test_experts_start_as_copies_of_the_dense_ffn_routers_fresh_and_the_rest_copied(dense_checkpoint, tmp_path):
    out = tmp_path / "upcycled.pt"
    result = upcycle(str(dense_checkpoint), str(out), seed=3)
    assert (result.arch, result.moe_layers) == ("xmoe_tiny", [1, 3])  # xmoe_tiny's layout: 4 experts in 1, 3

    dense, _, _ = load_encoder(str(dense_checkpoint))
    moe, enc_cfg, cfg = load_encoder(str(out))
    assert (enc_cfg.moe_experts, enc_cfg.moe_gate, cfg["model"]["_name"]) == (4, "xmoe", "xmoe_tiny")
    dense_state, moe_state = dense.state_dict(), moe.state_dict()
    for key, value in moe_state.items():
        if ".ffn.experts." in key or ".ffn.router." in key:
            continue
        assert torch.equal(value, dense_state[key]), key
    for layer in (1, 3):
        for name, tensor in _dense_ffn_tensors(dense, layer).items():
            experts = moe_state[f"layers.{layer}.ffn.experts.{name}"]
            assert experts.shape == (4, *tensor.shape)
            assert all(torch.equal(expert, tensor) for expert in experts), (layer, name)
    torch.manual_seed(3)
    fresh = XMoEEncoder(enc_cfg).state_dict()
    routers = [k for k in moe_state if ".ffn.router." in k]
    assert routers and all(torch.equal(moe_state[k], fresh[k]) for k in routers)

    state = load(out)  # weights_only + allow-list
    assert num_updates(state) == 0 and "last_optimizer_state" not in state
    assert state["upcycled_from"]["moe_layers"] == [1, 3]


def test_with_the_gate_fixed_to_one_the_moe_layers_reproduce_the_dense_ffn(dense_checkpoint, tmp_path):
    upcycle(str(dense_checkpoint), str(tmp_path / "upcycled.pt"))
    dense, _, _ = load_encoder(str(dense_checkpoint))
    moe, enc_cfg, _ = load_encoder(str(tmp_path / "upcycled.pt"))
    fix_gates_to_one(moe)
    x = torch.randn(2, 9, enc_cfg.encoder_embed_dim, generator=torch.Generator().manual_seed(0))
    for layer in (1, 3):
        expected = dense.layers[layer].ffn(x)
        got, aux = moe.layers[layer].ffn(x)
        assert aux.expert_index.unique().numel() > 1  # tokens really went to different experts
        # the same function; only the matmul kernels differ (batched vs plain), hence float rounding
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    tokens = _tokens(enc_cfg.vocab_size)
    real = tokens.ne(1)  # MoE layers leave padding positions out (their output there is 0)
    with torch.no_grad():
        torch.testing.assert_close(moe(tokens)[0][real], dense(tokens)[0][real], rtol=0, atol=1e-5)


def test_expert_noise_is_relative_to_the_copied_tensor_and_seeded(dense_checkpoint, tmp_path):
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        upcycle(str(dense_checkpoint), str(tmp_path / f"{name}.pt"), expert_noise=0.01, seed=seed)
    dense, _, _ = load_encoder(str(dense_checkpoint))
    states = {name: load_encoder(str(tmp_path / f"{name}.pt"))[0].state_dict() for name in "abc"}
    copied = _dense_ffn_tensors(dense, 1)["w1_EDF"]
    noisy = states["a"]["layers.1.ffn.experts.w1_EDF"]
    relative = (noisy - copied).std(dim=(1, 2)) / copied.std()
    assert torch.all((relative > 0.009) & (relative < 0.011)), relative
    assert not torch.equal(noisy[0], noisy[1])  # independently per expert
    assert torch.equal(noisy, states["b"]["layers.1.ffn.experts.w1_EDF"])
    assert not torch.equal(noisy, states["c"]["layers.1.ffn.experts.w1_EDF"])


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--moe-layers", "1,7"], r"--moe-layers \[7\] outside 0..3"),
        (["--moe-experts", "2", "--moe-top-k", "3"], r"top_k must be in \[1, num_experts=2\]"),
        (["--expert-noise", "-1"], r"--expert-noise must be >= 0"),
    ],
)
def test_bad_options_end_with_one_line_naming_them(dense_checkpoint, tmp_path, capsys, extra, message):
    out = tmp_path / "out.pt"
    assert main([str(dense_checkpoint), str(out), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("xmoe-upcycle: error:") and re.search(message, err), err
    assert not out.exists()


def test_bad_sources_and_an_existing_output_are_refused_without_touching_anything(dense_checkpoint, tmp_path, capsys):
    upcycled = tmp_path / "upcycled.pt"
    assert main([str(dense_checkpoint), str(upcycled)]) == 0
    before = upcycled.read_bytes()
    not_a_checkpoint = tmp_path / "notes.pt"
    not_a_checkpoint.write_text("hello")
    cases = [
        ([str(dense_checkpoint), str(upcycled)], "exists; give --force to replace it"),
        ([str(upcycled), str(tmp_path / "again.pt")], "already has MoE layers [1, 3]"),
        ([str(not_a_checkpoint), str(tmp_path / "x.pt")], f"cannot read checkpoint '{not_a_checkpoint}'"),
        ([str(tmp_path / "missing.pt"), str(tmp_path / "x.pt")], "does not exist"),
    ]
    capsys.readouterr()
    for argv, message in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, err
    assert upcycled.read_bytes() == before
    assert not (tmp_path / "again.pt").exists() and not (tmp_path / "x.pt").exists()


@pytest.mark.slow
def test_fairseq_train_continues_from_the_upcycled_checkpoint_at_update_0(dense_run, cli, toy_data, tmp_path, capsys):
    dense_checkpoint, dense_training = dense_run
    out = tmp_path / "upcycled.pt"
    assert main([str(dense_checkpoint), str(out), "--expert-noise", "0.01"]) == 0
    printed = capsys.readouterr().out
    command = next(line.strip() for line in printed.splitlines() if line.strip().startswith("fairseq-train"))
    # the dense run's task, and its dropout (none): the command keeps them
    assert command.startswith("fairseq-train DATA --user-dir xmoe --task masked_lm --criterion xmoe_masked_lm")
    assert f"--arch xmoe_tiny --dropout 0.0 --attention-dropout 0.0 --finetune-from-model {out}" in command, printed

    save_dir = tmp_path / "moe"
    args = cli.train_args(toy_data, save_dir, arch="xmoe_tiny", max_update=4) + ["--finetune-from-model", out]
    args += ["--log-interval", "1"]
    run = cli.run([cli.bin / "fairseq-train", *args], timeout=240)
    cli.ok(run)
    assert f"Loaded checkpoint {out} (epoch 1 @ 0 updates)" in run.output
    assert [int(r["num_updates"]) for r in run.json_logs("train_inner")] == [1, 2, 3, 4]
    # It starts about where the dense model got to, below a fresh model's loss (log2 of the
    # vocabulary, in bits as fairseq logs it).
    dense_last = losses(dense_training)[-1]
    first = losses(run)[0]
    fresh = math.log2(load(out)["model"]["encoder.embed_tokens.weight"].shape[0])
    assert first < dense_last + 0.3 and first < fresh - 0.3, (first, dense_last, fresh)
    assert num_updates(load(save_dir / "checkpoint_last.pt")) == 4

    # A relaunch of the same command resumes from checkpoint_last.pt, not from the upcycled file.
    again = cli.run([cli.bin / "fairseq-train", *(args[:-2] + ["--max-update", "5", "--log-interval", "1"])], timeout=240)
    cli.ok(again)
    assert re.search(r"Loaded checkpoint \S+checkpoint_last\.pt \(epoch \d+ @ 4 updates\)", again.output), again.output[-3000:]


@pytest.mark.slow
@pytest.mark.multiprocess
def test_expert_parallel_training_starts_from_the_upcycled_checkpoint(dense_checkpoint, cli, toy_data, tmp_path):
    out = tmp_path / "upcycled.pt"
    upcycle(str(dense_checkpoint), str(out), expert_noise=0.01)
    saved = load(out)["model"]
    args = cli.train_args(toy_data, tmp_path / "ep", arch="xmoe_tiny", max_update=2)
    args += ["--finetune-from-model", out, "--moe-expert-parallel", "--batch-size", "8"]
    record_dir = tmp_path / "loaded"
    run = cli.run(torchrun_command(cli, 2, args, script=RECORD_LOADED_STATE, script_args=(record_dir,)), timeout=300)
    cli.ok(run)
    assert "2 on this worker (expert parallel over 2 workers)" in run.output
    for rank in (0, 1):
        loaded = torch.load(record_dir / f"rank{rank}.pt")
        assert loaded["num_updates"] == 0
        for key, value in loaded["model"].items():
            expected = saved[key][2 * rank : 2 * rank + 2] if ".ffn.experts." in key else saved[key]
            assert torch.equal(value, expected), (rank, key)
    final = load(tmp_path / "ep" / "checkpoint_last.pt")
    assert num_updates(final) == 2 and final["model"]["encoder.layers.1.ffn.experts.w1_EDF"].shape[0] == 4
