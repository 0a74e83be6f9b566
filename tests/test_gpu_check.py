"""benchmarks/gpu_check.py's machinery, without running its steps (bash benchmarks/gpu_check.sh
--dry-run runs them all, in CI): a command past its limit is stopped with its whole process group
and the run goes on; each step's record rewrites the summary at once; logs in --out stay small; a
module the machine lacks is unpacked from a wheel; the deadline is never overrun.
"""
import argparse
import importlib.util
import json
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
gpu_check = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_check)


@pytest.fixture
def check(tmp_path):
    args = argparse.Namespace(out=str(tmp_path / "out"), work=str(tmp_path / "work"), wheels=str(tmp_path / "wheels"),
                              deadline=60.0, dry_run=True)
    return gpu_check.Check(args)


def test_a_command_past_its_limit_is_stopped_with_its_children(check, tmp_path):
    marker = tmp_path / "child_alive"
    script = (f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', "
              f"'import time; time.sleep(3); open(r\"{marker}\", \"w\")']); "
              "print('started', flush=True); time.sleep(30)")
    t0 = time.time()
    rc, text, secs = check.run([sys.executable, "-c", script], 1.5, "train.log")
    assert rc == 124 and "started" in text and "[stopped after" in text
    assert time.time() - t0 < 10
    time.sleep(3.5)
    assert not marker.exists(), "the child of the stopped command kept running"
    assert "started" in (Path(check.out) / "train.log").read_text()


def test_the_deadline_bounds_every_command(check):
    check.deadline = time.time() + 6  # 5 s are kept back for the summary
    rc, _, secs = check.run([sys.executable, "-c", "import time; time.sleep(30)"], 100, "train.log")
    assert rc == 124 and secs < 5


def test_each_record_rewrites_the_summary_and_the_json(check):
    check.record("preflight", status="ok", seconds=1.0, torch="2.11.0")
    check.record("kernels", status="FAILED", seconds=2.0, reason="a | b")
    summary = (Path(check.out) / "summary.md").read_text()
    assert "| preflight | ok | 1 | torch: 2.11.0 |" in summary and "reason: a / b" in summary
    data = json.loads((Path(check.out) / "gpu_check.json").read_text())
    assert data["kernels"]["status"] == "FAILED"
    assert sorted(p.name for p in Path(check.out).iterdir()) == ["gpu_check.json", "summary.md"]


def test_logs_in_out_keep_only_their_tail(check):
    for _ in range(3):
        rc, _, _ = check.run([sys.executable, "-c", "print('x' * 200_000)"], 20, "paper.log")
        assert rc == 0
    assert (Path(check.out) / "paper.log").stat().st_size <= gpu_check.LOG_TAIL


def test_a_missing_module_is_unpacked_from_its_wheel(check, tmp_path):
    wheels = Path(check.args.wheels)
    wheels.mkdir()
    with zipfile.ZipFile(wheels / "fakemod_for_check-1.0-py3-none-any.whl", "w") as z:
        z.writestr("fakemod_for_check/__init__.py", "VALUE = 42\n")
    assert not gpu_check._unpack_wheel(check, "absent_module")
    assert gpu_check._unpack_wheel(check, "fakemod_for_check")
    out = subprocess.run([sys.executable, "-c", "import fakemod_for_check as m; print(m.VALUE)"], env=check.env,
                         capture_output=True, text=True)
    assert out.stdout.strip() == "42", out.stderr


def test_versions_are_compared_as_numbers():
    assert gpu_check._version("2.11.0+cu128") == (2, 11) > (2, 9)
    assert gpu_check._version("3.6.0") >= gpu_check.SUPPORTED["triton"][0]
    assert not gpu_check._version("3.10.0") <= gpu_check.SUPPORTED["triton"][1]
