"""Every option comes from the dataclass: it shows, with help text, in the CLI and in Hydra."""

import argparse
import dataclasses

from omegaconf import OmegaConf

from fairseq.tasks import TASK_REGISTRY
from xmoe.tasks.mlm_tlm import MlmTlmConfig, MlmTlmTask, split_pair

# filled in from fairseq's common/dataset groups, not options of their own
INTERPOLATED = {"seed", "train_subset"}


def test_task_is_registered_with_its_dataclass():
    assert TASK_REGISTRY["xmoe_mlm_tlm"] is MlmTlmTask


def test_every_option_appears_in_the_cli_with_help_text():
    parser = argparse.ArgumentParser()
    MlmTlmTask.add_args(parser)
    actions = {a.dest: a for a in parser._actions}
    for f in dataclasses.fields(MlmTlmConfig):
        if f.name in INTERPOLATED or f.name.startswith("_"):  # _name: fairseq bookkeeping
            continue
        assert f.name in actions, f.name
        assert actions[f.name].help and len(actions[f.name].help) > 15, f.name
    help_text = parser.format_help()
    for flag in ("--languages", "--pairs", "--tokens-per-sample", "--mask-whole-words",
                 "--multilang-sampling-alpha", "--mlm-tlm-ratio", "--random-token-prob"):
        assert flag in help_text


def test_cli_defaults_match_the_dataclass():
    parser = argparse.ArgumentParser()
    MlmTlmTask.add_args(parser)
    args = parser.parse_args(["/some/data"])
    assert args.data == "/some/data"
    assert args.mlm_tlm_ratio == "1:1" and args.multilang_sampling_alpha == 0.3
    assert (args.mask_prob, args.leave_unmasked_prob, args.random_token_prob) == (0.15, 0.1, 0.1)


def test_config_is_a_structured_hydra_config_with_interpolated_seed():
    cfg = OmegaConf.structured(MlmTlmConfig)
    assert cfg.tokens_per_sample == 512 and cfg.mlm_tlm_ratio == "1:1"
    assert OmegaConf.to_container(cfg)["seed"] == "${common.seed}"
    assert OmegaConf.to_container(cfg)["train_subset"] == "${dataset.train_subset}"


def test_pair_codes_split_where_both_sides_are_known_languages():
    languages = ["en", "zh-cn", "pt-br", "zh"]
    assert split_pair("en-zh-cn", languages) == ("en", "zh-cn")
    assert split_pair("pt-br-en", languages) == ("pt-br", "en")
    assert split_pair("en-xx", languages) is None
