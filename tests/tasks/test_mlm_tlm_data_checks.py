"""Damaged or mismatched data is found when the task loads it, without reading whole files:
one line `xmoe_mlm_tlm: FILE[:LINE]: what is wrong`; fairseq-train exits with status 2, prints
no traceback and writes no checkpoint (nor crash.pt)."""

import json
import os
import re
from pathlib import Path

import pytest

from .conftest import mlm_tlm_train_args


def cut_in_half(path: str) -> None:
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])


def drop_last_dict_lines(data: str, count: int) -> None:
    path = os.path.join(data, "dict.txt")
    with open(path) as f:
        lines = f.readlines()
    with open(path, "w") as f:
        f.writelines(lines[:-count])


def edit_manifest(data: str, drop=(), **changes) -> None:
    path = os.path.join(data, "manifest.json")
    with open(path) as f:
        manifest = json.load(f)
    manifest.update(changes)
    for key in drop:
        del manifest[key]
    with open(path, "w") as f:
        json.dump(manifest, f)


def break_dict_line(data: str, line_no: int) -> None:
    path = os.path.join(data, "dict.txt")
    with open(path) as f:
        lines = f.readlines()
    lines[line_no - 1] = "\u2581w7\n"  # the count is missing
    with open(path, "w") as f:
        f.writelines(lines)


def test_a_bin_cut_short_names_the_file_and_both_sizes(own_data_dir, new_task):
    bin_path = os.path.join(own_data_dir, "mono", "de", "train.bin")
    full = os.path.getsize(bin_path)
    cut_in_half(bin_path)
    task = new_task(own_data_dir)
    with pytest.raises(ValueError, match=re.escape(
        f"xmoe_mlm_tlm: {bin_path}: is {full // 2} bytes but its .idx describes {full} (200 items)"
    )):
        task.load_dataset("train")


def test_a_bin_cut_short_is_found_also_with_an_old_manifest(own_data_dir, new_task):
    edit_manifest(own_data_dir, drop=("files", "dictionary_size"), format_version=1)
    bin_path = os.path.join(own_data_dir, "para", "en-fr", "valid.fr.bin")
    cut_in_half(bin_path)
    task = new_task(own_data_dir)
    with pytest.raises(ValueError, match=re.escape(f"xmoe_mlm_tlm: {bin_path}: is ")):
        task.load_dataset("valid")


def test_a_dataset_replaced_by_another_one_is_told_by_its_item_count(own_data_dir, new_task):
    for ext in (".bin", ".idx"):  # a consistent pair, but French data under German's name
        os.replace(os.path.join(own_data_dir, "mono", "fr", "train" + ext),
                   os.path.join(own_data_dir, "mono", "de", "train" + ext))
    task = new_task(own_data_dir, languages="en,de")
    bin_path = os.path.join(own_data_dir, "mono", "de", "train.bin")
    with pytest.raises(ValueError, match=re.escape(f"{bin_path}: has 60 items but ") + ".* records 200"):
        task.load_dataset("train")


def test_a_manifest_cut_in_half_names_the_file_and_line(own_data_dir, new_task):
    path = os.path.join(own_data_dir, "manifest.json")
    with open(path) as f:
        manifest = json.load(f)
    with open(path, "w") as f:
        json.dump(manifest, f, indent=1)
    cut_in_half(path)
    with open(path) as f:
        last_line = len(f.read().splitlines())
    with pytest.raises(ValueError, match=re.escape(f"xmoe_mlm_tlm: {path}:{last_line}: is not valid JSON (")):
        new_task(own_data_dir)


def test_a_malformed_dictionary_line_names_the_file_and_line(own_data_dir, new_task):
    break_dict_line(own_data_dir, 5)
    path = os.path.join(own_data_dir, "dict.txt")
    with pytest.raises(ValueError, match=re.escape(f"xmoe_mlm_tlm: {path}:5: expected '<piece> <count>")):
        new_task(own_data_dir)


def test_a_dictionary_shorter_than_the_recorded_one_is_refused(own_data_dir, new_task):
    drop_last_dict_lines(own_data_dir, 10)
    path = os.path.join(own_data_dir, "dict.txt")
    with pytest.raises(ValueError, match=re.escape(
        f"xmoe_mlm_tlm: {path}: has 54 entries (specials included) but the data was binarized with "
        "a dictionary of 64"
    )):
        new_task(own_data_dir)


def test_a_dictionary_shorter_than_the_largest_id_is_refused(own_data_dir, new_task):
    edit_manifest(own_data_dir, drop=("dictionary_size",))  # only the per-file largest ids are left
    drop_last_dict_lines(own_data_dir, 10)
    task = new_task(own_data_dir)
    path = os.path.join(own_data_dir, "dict.txt")
    with pytest.raises(ValueError, match=re.escape(f"xmoe_mlm_tlm: {path}: has 54 entries (specials included), "
                                                   "but ") + r".*mono/en/train\.bin holds ids up to 63"):
        task.load_dataset("train")


def test_an_old_manifest_loads_and_says_the_ids_are_checked_only_when_read(own_data_dir, new_task, caplog):
    edit_manifest(own_data_dir, drop=("files", "dictionary_size"), format_version=1)
    with caplog.at_level("WARNING", logger="xmoe.tasks.mlm_tlm"):
        task = new_task(own_data_dir)
        task.load_dataset("train")
    dataset = task.dataset("train")
    assert all(len(dataset[i]["source"]) > 0 for i in range(len(dataset)))
    assert any("(format_version 1) does not record each file's largest id: ids are checked against "
               "the dictionary only as items are read" in m for m in caplog.messages)


def test_with_an_old_manifest_an_id_beyond_the_dictionary_stops_at_the_first_item_holding_it(
    own_data_dir, new_task
):
    edit_manifest(own_data_dir, drop=("files", "dictionary_size"), format_version=1)
    drop_last_dict_lines(own_data_dir, 10)
    task = new_task(own_data_dir, mlm_tlm_ratio="1:0", languages="fr")
    task.load_dataset("train")  # loads: nothing read yet
    dataset = task.dataset("train")
    bin_path = os.path.join(own_data_dir, "mono", "fr", "train.bin")
    with pytest.raises(ValueError, match=re.escape(f"xmoe_mlm_tlm: {bin_path}: item ") + r"\d+ holds id \d+, but "
                       + re.escape(f"{os.path.join(own_data_dir, 'dict.txt')} has 54 entries")):
        for i in range(len(dataset)):
            dataset[i]


# ---- the same faults through fairseq-train ----------------------------------------------

FAULTS = {
    "bin cut in half": lambda data: cut_in_half(os.path.join(data, "mono", "en", "train.bin")),
    "manifest cut in half": lambda data: cut_in_half(os.path.join(data, "manifest.json")),
    "malformed dict line": lambda data: break_dict_line(data, 3),
    "dict shorter than the ids": lambda data: drop_last_dict_lines(data, 10),
}


@pytest.mark.slow
@pytest.mark.parametrize("fault", list(FAULTS), ids=list(FAULTS))
def test_fairseq_train_stops_with_one_line_and_status_2_writing_nothing(own_data_dir, cli, tmp_path, fault):
    FAULTS[fault](own_data_dir)
    save_dir = tmp_path / "checkpoints"
    args = mlm_tlm_train_args(cli, own_data_dir, save_dir, **{"--max-update": 2})
    run = cli.run([cli.bin / "fairseq-train", *args], timeout=120)
    assert run.returncode == 2, run.output[-3000:]
    assert "Traceback" not in run.output
    last = run.output.strip().splitlines()[-1]
    assert re.fullmatch(rf"xmoe_mlm_tlm: {re.escape(own_data_dir)}/\S+: .+", last), run.output[-3000:]
    assert list(Path(save_dir).glob("*.pt")) == []
