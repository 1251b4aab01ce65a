"""The --compare-env plumbing of the benchmark scripts (benchmarks/bench_common.py): child runs
with and without the setting, interleaved, the base free of the compared variable even when the
caller has it set, medians and ratios of what the children printed. A small child script stands
in for a benchmark here, so the test takes well under a second; no timing is asserted."""

import argparse
import importlib.util
import json
from pathlib import Path

import pytest

BENCH_COMMON = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_common.py"
spec = importlib.util.spec_from_file_location("bench_common", BENCH_COMMON)
bench_common = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench_common)

# Prints one JSON line like a benchmark: a value that depends on XMOE_PROBE, a constant, a nested
# field, and the compared variable as this process sees it; appends its variant to a log so the
# order of the runs can be checked.
CHILD = """
import json, os, sys
probe = os.environ.get("XMOE_PROBE")
with open(sys.argv[1], "a") as log:
    log.write(f"{probe}\\n")
run = sum(1 for _ in open(sys.argv[1]))
print("some other output")
print(json.dumps({"seconds": 2.0 * run if probe == "1" else 1.0 * run, "tokens": 64,
                  "models": {"xmoe": {"wps": 10.0 if probe == "1" else 5.0}}, "gate": "xmoe",
                  "env": {"XMOE_PROBE": probe}}))
"""


def test_children_run_with_and_without_the_setting_interleaved(tmp_path, monkeypatch, capsys):
    script, log = tmp_path / "child.py", tmp_path / "runs.log"
    script.write_text(CHILD)
    monkeypatch.setenv("XMOE_PROBE", "0")  # the base must not inherit it
    result = bench_common.compare_env(str(script), [str(log)], [{"XMOE_PROBE": "1"}], rounds=3)

    # base first in round 1, the variant first in round 2, ...
    assert log.read_text().split() == ["None", "1", "1", "None", "None", "1"]
    base, variant = result["variants"]["base"], result["variants"]["XMOE_PROBE=1"]
    assert base["env"] == {"XMOE_PROBE": None} and variant["env"] == {"XMOE_PROBE": "1"}
    # runs 1, 4, 5 were the base (seconds = run), 2, 3, 6 the variant (seconds = 2 * run)
    assert base["median"] == {"seconds": 4.0, "models.xmoe.wps": 5.0}
    assert (base["min"]["seconds"], base["max"]["seconds"]) == (1.0, 5.0)
    assert variant["median"] == {"seconds": 6.0, "models.xmoe.wps": 10.0}
    assert result["vs_base"] == {"XMOE_PROBE=1": {"seconds": 1.5, "models.xmoe.wps": 2.0}}
    assert result["config"] == {"tokens": 64}
    assert result["rounds"] == 3 and result["child_argv"] == [str(log)]
    assert len(result["load_average_start"]) == 3 and len(result["load_average_end"]) == 3
    json.dumps(result)
    # each child's line went to stderr as it came
    progress = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert [(p["round"], p["variant"], p["result"]["env"]["XMOE_PROBE"]) for p in progress] == [
        (1, "base", None), (1, "XMOE_PROBE=1", "1"), (2, "XMOE_PROBE=1", "1"), (2, "base", None),
        (3, "base", None), (3, "XMOE_PROBE=1", "1")]


def test_a_failing_child_stops_the_comparison_with_its_message(tmp_path):
    script = tmp_path / "child.py"
    script.write_text("import sys; sys.exit('child.py: bad option')\n")
    with pytest.raises(SystemExit) as stop:
        bench_common.compare_env(str(script), [], [{"XMOE_PROBE": "1"}], rounds=1)
    assert str(stop.value) == "child.py: child run (base) failed with exit code 1:\nchild.py: bad option"


def test_env_setting_parses_names_and_values_and_rejects_the_rest():
    assert bench_common.env_setting("THP_MEM_ALLOC_ENABLE=1") == {"THP_MEM_ALLOC_ENABLE": "1"}
    assert bench_common.env_setting("A=1 GLIBC_TUNABLES=glibc.malloc.hugetlb=1:glibc.malloc.mmap_max=0") == {
        "A": "1", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1:glibc.malloc.mmap_max=0"}
    for bad in ("THP_MEM_ALLOC_ENABLE", "=1", "A-B=1", " "):
        with pytest.raises(argparse.ArgumentTypeError):
            bench_common.env_setting(bad)
