"""benchmarks/gpu_check.sh where no GPU is visible: one line, exit 0, nothing written.
(What it does on a CUDA machine is not testable here; its JSON summary is described in the
script.)"""

import os
import subprocess
import sys
from pathlib import Path

GPU_CHECK = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_check.sh"


def run_gpu_check(*args, tmp_path: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", XMOE_VENV=str(Path(sys.executable).parent.parent))
    return subprocess.run(["bash", str(GPU_CHECK), *map(str, args)], capture_output=True, text=True, env=env,
                          timeout=120, cwd=tmp_path)


def test_without_a_gpu_it_says_so_in_one_line_and_exits_0(tmp_path):
    result = run_gpu_check("--work-dir", tmp_path / "check", tmp_path=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "gpu_check.sh: no CUDA device visible (torch.cuda.is_available() is False): nothing measured"
    ]
    assert result.stderr == ""
    assert not (tmp_path / "check").exists()


def test_help_and_bad_arguments(tmp_path):
    help_text = run_gpu_check("--help", tmp_path=tmp_path)
    assert help_text.returncode == 0 and "Prints one JSON summary" in help_text.stdout
    bad = run_gpu_check("--bogus", tmp_path=tmp_path)
    assert bad.returncode == 2 and bad.stderr.strip() == "gpu_check.sh: error: unknown argument --bogus (see --help)"
