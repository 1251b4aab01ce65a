"""`xmoe-analyze rf / rc / load / consistency` on a tiny model trained by fairseq-train."""

import json

import numpy as np
import pytest
import torch

from xmoe.analysis import representation_collapse
from xmoe.analysis.cli import main
from xmoe.analysis.corpus import BinarizedCorpus, build_token_sample

pytestmark = pytest.mark.slow  # the shared fixture trains a model with fairseq-train once

MOE_LAYERS = ["1", "3"]  # xmoe_tiny: 4 experts in layers 1 and 3


def run_command(*argv) -> dict:
    """Run xmoe-analyze in this process and return the JSON it wrote."""
    argv = [str(a) for a in argv]
    assert main(argv) == 0
    out = argv[argv.index("--out") + 1]
    name = {"consistency": "consistency.json"}.get(argv[0], f"{argv[0]}.json")
    with open(f"{out}/{name}") as f:
        return json.load(f)


def test_routing_fluctuation_of_a_checkpoint_against_itself_is_zero(trained_run, analysis_corpus, tmp_path):
    result = run_command("rf", trained_run.last, trained_run.last, "--data", analysis_corpus, "--out", tmp_path)
    (transition,) = result["transitions"]
    assert sorted(transition["layers"]) == MOE_LAYERS
    for layer in transition["layers"].values():
        assert layer["rf"] == 0.0 and layer["changed"] == 0
        assert layer["compared"] == result["num_tokens"] > 0  # dropless: every token routed
        assert set(layer["by_group"].values()) == {0.0}
    assert (tmp_path / "rf.png").stat().st_size > 0


def test_routing_fluctuation_against_redrawn_routers_is_high(
    trained_run, redrawn_router_checkpoints, analysis_corpus, tmp_path
):
    fluctuations = {key: [] for key in MOE_LAYERS}
    for number, redrawn in enumerate(redrawn_router_checkpoints):
        result = run_command("rf", trained_run.last, redrawn, "--data", analysis_corpus, "--out", tmp_path / str(number))
        for key in MOE_LAYERS:
            fluctuations[key].append(result["transitions"][0]["layers"][key]["rf"])
    # A freshly drawn router knows nothing of the trained one, and its initialisation treats
    # the 4 experts alike, so over the draw each token lands on each expert with probability
    # 1/4: it keeps its trained expert with probability 1/4 and the expected RF is exactly 3/4,
    # whatever the loads. One draw can stray far from it when the fresh and the trained router
    # happen to pile most tokens onto the same expert (tokens share a common direction, which a
    # random projection maps near one expert embedding), so we average independent draws.
    # (In layer 3 the inputs move as well: layer 1 sent the tokens through other experts.)
    for key, values in fluctuations.items():
        assert np.mean(values) > 0.5, (key, values)
        assert min(values) > 0.0, (key, values)


def test_routing_fluctuation_series_follows_update_numbers(trained_run, analysis_corpus, tmp_path):
    result = run_command("rf", trained_run.early, trained_run.last, trained_run.last, "--data", analysis_corpus,
                         "--out", tmp_path, "--langs", "en,de", "--pairs", "none", "--max-tokens", "100")
    assert [c["num_updates"] for c in result["checkpoints"]] == [5, 10, 10]
    assert result["tokens_per_group"] == {"en": 100, "de": 100}
    assert len(result["transitions"]) == 2
    assert [t["layers"]["1"]["rf"] for t in result["transitions"]][1] == 0.0
    assert 0.0 <= result["transitions"][0]["mean_rf"] <= 1.0


def router_inputs_by_hand(checkpoint_path, corpus_path):
    """The MoE layers' inputs and routed experts, one sequence at a time, without the CLI's batching."""
    from xmoe.checkpoint import load_encoder

    encoder, _, cfg = load_encoder(str(checkpoint_path))
    for moe in encoder.moe_layers():
        moe.eval_capacity_factor = 0.0  # dropless, as the CLI runs by default
    sample = build_token_sample(BinarizedCorpus(str(corpus_path)), "valid", ["en", "de", "fr"], ["en-de", "en-fr"],
                                tokens_per_group=4096, tokens_per_sample=cfg["task"]["tokens_per_sample"])
    features = {layer: [] for layer in range(2)}
    routed = {layer: [] for layer in range(2)}
    seen = []
    hooks = [moe.register_forward_pre_hook(lambda module, args: seen.append(args[0][0])) for moe in encoder.moe_layers()]
    with torch.no_grad():
        for sequence in sample.sequences:
            seen.clear()
            _, extra = encoder(sequence.tokens[None], src_langs=sequence.langs[None],
                               src_positions=sequence.positions[None], features_only=True)
            for layer in range(2):
                features[layer].append(seen[layer])  # (T, C)
                routed[layer].append(extra["moe_aux"][layer].routed_index[0])  # (T,)
    for hook in hooks:
        hook.remove()
    return {layer: (torch.cat(features[layer]), torch.cat(routed[layer])) for layer in range(2)}


def test_representation_collapse_equals_the_metric_on_hooked_router_inputs(trained_run, analysis_corpus, tmp_path):
    result = run_command("rc", trained_run.early, trained_run.last, "--data", analysis_corpus, "--out", tmp_path)
    by_hand = router_inputs_by_hand(trained_run.last, analysis_corpus)
    last = result["checkpoints"][1]["layers"]
    for layer_number, key in enumerate(MOE_LAYERS):
        features_ND, routed_N = by_hand[layer_number]
        expected = representation_collapse(features_ND, routed_N)
        assert np.isfinite(expected) and expected > 0
        assert last[key]["rc"] == pytest.approx(expected, rel=1e-4)
        assert last[key]["num_tokens"] == len(routed_N) == sum(last[key]["tokens_per_expert"])
        assert last[key]["tokens_per_expert"] == torch.bincount(routed_N, minlength=4).tolist()
    assert (tmp_path / "rc.png").stat().st_size > 0  # two checkpoints: a plot over updates


def test_expert_load_rows_sum_to_one_and_heatmaps_are_written(trained_run, analysis_corpus, tmp_path):
    result = run_command("load", trained_run.last, "--data", analysis_corpus, "--out", tmp_path)
    assert result["groups"] == ["en", "de", "fr", "en-de", "en-fr"]
    assert result["num_experts"] == 4 and sorted(result["layers"]) == MOE_LAYERS
    for key, layer in result["layers"].items():
        load_GE, counts_GE = np.array(layer["load"]), np.array(layer["counts"])
        assert load_GE.shape == (5, 4)
        np.testing.assert_allclose(load_GE.sum(axis=1), 1.0, rtol=1e-12)
        np.testing.assert_allclose(load_GE, counts_GE / counts_GE.sum(axis=1, keepdims=True))
        assert counts_GE.sum(axis=1).tolist() == list(result["tokens_per_group"].values())
        assert sum(layer["overall"]) == pytest.approx(1.0)
        assert layer["dropped_fraction"] == 0.0
        assert (tmp_path / f"load_layer{key}.png").stat().st_size > 0


def test_consistency_of_a_run_with_itself_is_one(trained_run, analysis_corpus, tmp_path):
    run_command("load", trained_run.last, "--data", analysis_corpus, "--out", tmp_path / "load")
    loads = tmp_path / "load" / "load.json"
    # the same run twice: once as its load.json, once recomputed from the checkpoint
    result = run_command("consistency", loads, trained_run.last, "--data", analysis_corpus, "--out", tmp_path)
    for key in MOE_LAYERS:
        assert result["layers"][key]["by_group"] == pytest.approx(1.0)
        assert result["layers"][key]["overall"] == pytest.approx(1.0)
    assert result["all_layers"]["by_group"] == pytest.approx(1.0)
    assert (tmp_path / "load_run1.json").is_file()


def test_consistency_of_different_checkpoints_is_a_correlation(trained_run, analysis_corpus, tmp_path):
    result = run_command("consistency", trained_run.early, trained_run.last, trained_run.last,
                         "--data", analysis_corpus, "--out", tmp_path)
    value = result["all_layers"]["by_group"]
    assert -1.0 <= value < 1.0
