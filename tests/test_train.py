"""train.py: a short run lowers the loss and writes eval.json; resume continues the same run exactly."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import cmki
import train

SMALL = ["--synth_n=36", "--batch_size=6", "--log_interval=1", "--eval_interval=0", "--workers=0",
         "--vocab_size=300"]


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("synth")


def test_help_explains_every_flag(capsys):
    with pytest.raises(SystemExit):
        train.parse_args(["--help"])
    text = capsys.readouterr().out
    for f in train.fields(train.TrainConfig):
        assert f"--{f.name}" in text, f"--{f.name} missing from --help"


def test_bad_preset_is_rejected():
    with pytest.raises(SystemExit):
        train.parse_args(["--preset=huge"])


def test_short_run_lowers_loss_and_writes_eval(synth_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(cmki, "USE_KERNELS", False)  # eager maths: fast (kernels: test_kernels_training)
    out = tmp_path / "run"
    result = train.main(SMALL + ["--max_iters=40", "--batch_size=12", "--warmup_iters=0",
                                 f"--synth_dir={synth_dir}", f"--out_dir={out}"])
    losses = result["history"]
    assert len(losses) == 40
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first - 0.3, f"loss did not go down: {losses}"
    saved = json.loads((out / "eval.json").read_text())
    assert set(saved["auc"]) == set(train.data_lib.CTRATE_CLASSES)
    assert 0.0 <= saved["macro_auc"] <= 1.0
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 40 and tuple(ckpt["model_config"]["image_size"]) == (48, 48, 32)


def test_resume_continues_the_same_run(synth_dir, tmp_path):
    common = SMALL + [f"--synth_dir={synth_dir}", "--ckpt_interval=3", "--warmup_iters=0"]
    straight = train.main(common + ["--max_iters=6", f"--out_dir={tmp_path / 'a'}"])
    train.main(common + ["--max_iters=3", f"--out_dir={tmp_path / 'b'}"])
    resumed = train.main(common + ["--max_iters=6", f"--out_dir={tmp_path / 'b'}", "--resume"])
    assert resumed["history"] == straight["history"][3:]
    a = torch.load(tmp_path / "a" / "ckpt.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "b" / "ckpt.pt", weights_only=True)["model"]
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resume"


def test_resume_without_checkpoint_names_the_file(synth_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="ckpt.pt"):
        train.main(SMALL + [f"--synth_dir={synth_dir}", f"--out_dir={tmp_path}", "--resume"])


def test_sigkill_then_resume_ends_with_the_uninterrupted_parameters(synth_dir, tmp_path, monkeypatch):
    """A run killed with SIGKILL mid-way and resumed (--auto_resume, as torchrun --max-restarts
    would rerun it) ends bitwise equal to an uninterrupted run, with a data-loader worker process."""
    monkeypatch.setattr(cmki, "USE_KERNELS", False)  # eager maths in both processes
    common = SMALL[:-2] + ["--workers=1", "--vocab_size=300", f"--synth_dir={synth_dir}",
                           "--warmup_iters=0", "--max_iters=5", "--ckpt_interval=1", "--auto_resume"]
    straight = train.main(common + [f"--out_dir={tmp_path / 'a'}"])
    env = dict(os.environ, TRITON_INTERPRET="0")
    cmd = [sys.executable, str(Path(train.__file__)), *common, f"--out_dir={tmp_path / 'b'}"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt, deadline = tmp_path / "b" / "ckpt.pt", time.time() + 90
    while not (ckpt.is_file() and torch.load(ckpt, weights_only=True)["step"] >= 2):
        assert proc.poll() is None, "the run ended before it could be killed"
        assert time.time() < deadline, "no checkpoint within 90 s"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = torch.load(ckpt, weights_only=True)["step"]
    assert killed_at < 5, "killed too late to test anything"
    resumed = train.main(common + [f"--out_dir={tmp_path / 'b'}"])
    assert resumed["history"] == straight["history"][killed_at:]
    a = torch.load(tmp_path / "a" / "ckpt.pt", weights_only=True)
    b = torch.load(ckpt, weights_only=True)
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), f"{k} differs after kill + resume"
    assert a["optimizer"]["state"][0]["step"] == b["optimizer"]["state"][0]["step"] == 5
