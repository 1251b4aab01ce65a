"""Helpers under scripts/: the torchrun wrapper's options and the toy corpus."""

import json

import pytest


TORCHRUN_ENV = {"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2"}


def test_torchrun_wrapper_joins_torchruns_group_with_cpu_backends(script):
    extra = script("fairseq_train_torchrun").distributed_args(["data", "--cpu"], TORCHRUN_ENV)

    def value(option):
        return extra[extra.index(option) + 1]

    assert value("--distributed-world-size") == "2" and value("--distributed-rank") == "1"
    assert value("--distributed-init-method") == "env://"
    assert value("--distributed-backend") == "gloo" and value("--ddp-backend") == "legacy_ddp"
    assert "--distributed-no-spawn" in extra


def test_torchrun_wrapper_keeps_explicit_options_and_uses_local_rank_on_gpu(script):
    wrapper = script("fairseq_train_torchrun")
    extra = wrapper.distributed_args(["data", "--cpu", "--ddp-backend=no_c10d"], TORCHRUN_ENV)
    assert "--ddp-backend" not in extra
    gpu = wrapper.distributed_args(["data"], TORCHRUN_ENV)
    assert gpu[gpu.index("--device-id") + 1] == "1" and "--distributed-backend" not in gpu


def test_torchrun_wrapper_refuses_to_run_outside_torchrun(script):
    with pytest.raises(SystemExit, match="torchrun"):
        script("fairseq_train_torchrun").distributed_args(["data"], {})


def test_toy_corpus_is_reproducible_and_binarized(script, tmp_path):
    from fairseq.data import Dictionary, data_utils

    toy = script("make_toy_data")
    toy.write_toy_corpus(tmp_path / "a", train_lines=50, valid_lines=5, seed=7)
    toy.write_toy_corpus(tmp_path / "b", train_lines=50, valid_lines=5, seed=7)
    assert (tmp_path / "a" / "train.bin").read_bytes() == (tmp_path / "b" / "train.bin").read_bytes()
    dictionary = Dictionary.load(str(tmp_path / "a" / "dict.txt"))
    dataset = data_utils.load_indexed_dataset(str(tmp_path / "a" / "train"), dictionary)
    assert len(dataset) == 50
    first_line = (tmp_path / "a" / "train.txt").read_text().splitlines()[0]
    assert dictionary.string(dataset[0]) == first_line  # ids + eos, as fairseq-preprocess writes


@pytest.mark.slow
def test_main_job_prepares_trains_resumes_reports_ppl_and_exports(cli, script, tmp_path):
    """scripts/main_job.sh end to end on a toy RAW corpus (everything but the package download):
    prepare.sh -> two fairseq-train legs -> per-group perplexities -> export -> retrieval."""
    cache = tmp_path / "cache"
    script("make_toy_data").write_toy_raw(cache / "raw", train_lines=400, seed=3)
    env = {
        "XMOE_VENV": str(cli.bin.parent), "XMOE_CACHE": str(cache),  # the corpus goes to CACHE/data-bin
        "XMOE_WORK_DIR": str(tmp_path / "work"), "MAX_UPDATE": "4",
        "XMOE_LANGS": "en de fr", "XMOE_VOCAB_SIZE": "32", "XMOE_WORKERS": "1",
    }
    run = cli.run(["env", *(f"{k}={v}" for k, v in env.items()), "bash", cli.repo / "scripts" / "main_job.sh",
                   "--tokens-per-sample", "64", "--batch-size", "8"], timeout=600)
    cli.ok(run)
    assert "leg 2: resume from" in run.output
    assert "(epoch 1 @ 2 updates" in run.output  # the second leg starts from the first leg's checkpoint
    report = run.output[run.output.index("validation perplexity at update 4: all "):].splitlines()
    groups = [line.split()[0] for line in report[1:6]]
    assert groups == ["de", "en", "fr", "en-de", "en-fr"]  # languages first, then pairs
    assert all(float(line.split()[1]) > 1 for line in report[1:6])
    assert (cache / "data-bin" / "manifest.json").is_file()
    assert (tmp_path / "work" / "exported" / "model.safetensors").stat().st_size > 10_000
    retrieval = json.loads((tmp_path / "work" / "retrieval" / "retrieval.json").read_text())
    assert retrieval["centring"] == "language" and sorted(retrieval["baselines"]) == ["random_init", "tfidf"]
    assert "random init" in run.output and "TF-IDF pieces" in run.output  # printed beside the model
    assert "no topic task" in run.output  # a RAW corpus of one's own: no help packages to build it from
    assert any((tmp_path / "work" / "tensorboard").rglob("events.out.tfevents.*"))
