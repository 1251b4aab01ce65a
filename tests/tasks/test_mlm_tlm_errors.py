"""Bad input stops with a message that names the file or option at fault."""

import json
import os
import re

import numpy as np
import pytest
from fairseq.data.indexed_dataset import MMapIndexedDatasetBuilder


def edit_manifest(data: str, **changes) -> None:
    path = os.path.join(data, "manifest.json")
    with open(path) as f:
        manifest = json.load(f)
    manifest.update(changes)
    with open(path, "w") as f:
        json.dump(manifest, f)


def test_missing_data_folder_names_the_folder(tmp_path, new_task):
    missing = str(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=re.escape(f"xmoe_mlm_tlm: {missing}: data folder does not exist")):
        new_task(missing)


def test_missing_manifest_names_the_file(own_data_dir, new_task):
    os.remove(os.path.join(own_data_dir, "manifest.json"))
    with pytest.raises(FileNotFoundError, match=re.escape(os.path.join(own_data_dir, "manifest.json"))):
        new_task(own_data_dir)


def test_broken_manifest_json_names_the_file(own_data_dir, new_task):
    with open(os.path.join(own_data_dir, "manifest.json"), "w") as f:
        f.write("{not json")
    with pytest.raises(ValueError, match=re.escape("manifest.json:1: is not valid JSON")):
        new_task(own_data_dir)


def test_manifest_without_languages_is_rejected(own_data_dir, new_task):
    edit_manifest(own_data_dir, languages=[])
    with pytest.raises(ValueError, match="non-empty list of language codes under 'languages'"):
        new_task(own_data_dir)


def test_missing_dictionary_names_the_file(own_data_dir, new_task):
    os.remove(os.path.join(own_data_dir, "dict.txt"))
    with pytest.raises(FileNotFoundError, match=re.escape(os.path.join(own_data_dir, "dict.txt"))):
        new_task(own_data_dir)


def test_unknown_language_option_names_it_and_lists_the_manifest_languages(data_dir, new_task):
    with pytest.raises(ValueError, match=r"--languages: unknown language 'xx'; .* lists en, de, fr"):
        new_task(data_dir, languages="en,xx")


def test_unknown_pair_option_names_it_and_lists_the_manifest_pairs(data_dir, new_task):
    with pytest.raises(ValueError, match=r"--pairs: unknown pair 'de-fr'; .* lists en-de, en-fr"):
        new_task(data_dir, pairs="de-fr")


def test_manifest_language_without_any_data_names_the_expected_file(own_data_dir, new_task):
    edit_manifest(own_data_dir, languages=["en", "de", "fr", "ru"])
    expected = os.path.join(own_data_dir, "mono", "ru", "train.bin")
    with pytest.raises(
        FileNotFoundError, match=re.escape("lists language 'ru' but no data for it") + ".*"
        + re.escape(expected),
    ):
        new_task(own_data_dir)


def test_manifest_language_whose_files_are_missing_names_the_missing_file(own_data_dir, new_task):
    with open(os.path.join(own_data_dir, "manifest.json")) as f:
        sizes = json.load(f)["sizes"]
    sizes["train"]["mono"]["ru"] = 50
    edit_manifest(own_data_dir, languages=["en", "de", "fr", "ru"], sizes=sizes)
    task = new_task(own_data_dir)
    missing = os.path.join(own_data_dir, "mono", "ru", "train")
    with pytest.raises(FileNotFoundError, match=re.escape(f"{missing}.idx: is missing ('train' data for language 'ru')")):
        task.load_dataset("train")


def test_requested_language_without_monolingual_data_is_rejected(tmp_path, binarize, new_task):
    data = binarize(str(tmp_path / "fr_pairs_only"), train_lines={"en": 100, "de": 50})
    with pytest.raises(ValueError, match=r"--languages: 'fr' has no monolingual 'train' data"):
        new_task(data, languages="en,fr")


def test_requested_pair_without_training_data_is_rejected(own_data_dir, new_task):
    edit_manifest(own_data_dir, pairs=["en-de", "en-fr", "de-fr"])
    with pytest.raises(ValueError, match=r"--pairs: 'de-fr' has no 'train' data; .* records it for en-de, en-fr"):
        new_task(own_data_dir, pairs="de-fr")


def test_split_without_any_data_for_the_selection_is_rejected(tmp_path, binarize, new_task):
    data = binarize(str(tmp_path / "no_valid"), valid_lines={}, valid_pairs={})
    task = new_task(data)
    with pytest.raises(ValueError, match=r"records no 'valid' data .* --disable-validation"):
        task.load_dataset("valid")


def test_missing_parallel_side_names_the_file(own_data_dir, new_task):
    missing = os.path.join(own_data_dir, "para", "en-fr", "valid.fr.idx")
    os.remove(missing)
    task = new_task(own_data_dir)
    with pytest.raises(FileNotFoundError, match=re.escape(f"{missing}: is missing ('valid' data for pair 'en-fr')")):
        task.load_dataset("valid")


def test_empty_dataset_names_the_file(own_data_dir, new_task):
    prefix = os.path.join(own_data_dir, "mono", "fr", "train")
    MMapIndexedDatasetBuilder(prefix + ".bin", dtype=np.int32).finalize(prefix + ".idx")
    task = new_task(own_data_dir)
    with pytest.raises(ValueError, match=re.escape(f"{prefix}.bin: is empty")):
        task.load_dataset("train")


@pytest.mark.parametrize(
    "options, message",
    [
        ({"mlm_tlm_ratio": "1-1"}, "--mlm-tlm-ratio must look like MLM:TLM"),
        ({"mlm_tlm_ratio": "0:0"}, "--mlm-tlm-ratio must look like MLM:TLM"),
        ({"mlm_tlm_ratio": "a:1"}, "--mlm-tlm-ratio must look like MLM:TLM"),
        ({"tokens_per_sample": 4}, "--tokens-per-sample must be at least 8"),
        ({"mask_prob": 0.0}, "--mask-prob must be in"),
        ({"multilang_sampling_alpha": -1.0}, "--multilang-sampling-alpha must be >= 0"),
    ],
)
def test_bad_options_name_the_option(data_dir, new_task, options, message):
    with pytest.raises(ValueError, match=message):
        new_task(data_dir, **options)


def test_samples_longer_than_the_model_accepts_are_reported(data_dir, new_task):
    task = new_task(data_dir, tokens_per_sample=64)
    task.load_dataset("valid")
    iterator = task.get_batch_iterator(task.dataset("valid"), max_tokens=4096, max_positions=16)
    with pytest.raises(ValueError, match="longer than 16 tokens"):
        iterator.next_epoch_itr()


def test_tlm_only_ratio_without_pairs_is_rejected(tmp_path, binarize, new_task):
    data = binarize(str(tmp_path / "mono_only"), train_pairs={})
    with pytest.raises(ValueError, match=r"--mlm-tlm-ratio 0:1 asks for TLM only.*manifest pairs: none"):
        new_task(data, mlm_tlm_ratio="0:1")


def test_manifest_pair_of_unknown_languages_is_rejected(own_data_dir, new_task):
    edit_manifest(own_data_dir, pairs=["en-de", "en-xx"])
    with pytest.raises(ValueError, match="manifest.json: pair 'en-xx' does not join two of its languages"):
        new_task(own_data_dir)


def test_a_language_with_only_validation_data_is_called_untrained_not_tlm_only(
    tmp_path, binarize, new_task, caplog
):
    data = binarize(str(tmp_path / "fr_valid_only"), train_lines={"en": 100, "de": 50},
                    train_pairs={"en-de": 40}, valid_pairs={"en-de": 12})
    with caplog.at_level("INFO", logger="xmoe.tasks.mlm_tlm"):
        task = new_task(data)
    assert task.languages == ["en", "de"]
    assert not any("used in TLM pairs only" in m for m in caplog.messages)
    assert any(m.endswith("no 'train' data for ['fr'] (no monolingual file, no pair): never trained on, "
                          "only evaluated") for m in caplog.messages)
