"""train.py: a short run lowers the loss and writes eval.json; resume continues the same run exactly."""
import json

import pytest
import torch

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


def test_short_run_lowers_loss_and_writes_eval(synth_dir, tmp_path):
    out = tmp_path / "run"
    result = train.main(SMALL + ["--max_iters=12", "--lr=2e-3", "--warmup_iters=0",
                                 f"--synth_dir={synth_dir}", f"--out_dir={out}"])
    losses = result["history"]
    assert len(losses) == 12
    assert sum(losses[-3:]) / 3 < losses[0] - 0.1, f"loss did not go down: {losses}"
    saved = json.loads((out / "eval.json").read_text())
    assert set(saved["auc"]) == set(train.data_lib.CTRATE_CLASSES)
    assert 0.0 <= saved["macro_auc"] <= 1.0
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 12 and ckpt["model_config"]["image_size"] == [48, 48, 32]


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
