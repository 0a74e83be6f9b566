"""train.py: a short run lowers the loss and writes eval.json; resume continues the same run exactly
(dropout and warm-up included), after a kill, Ctrl-C or SIGTERM too; a full disk, a second run into
the same folder and bad flags end with one line; 2 gloo ranks train like 1 process on the same
global batch (all-gathered negatives)."""
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

import cmki
import data as data_lib
import eval as eval_lib
import train
from analysis.files import read_score_csv
from model import PRESETS
from prepare import files
from prepare.inputs import split_validation, summaries_of, training_inputs, with_reports

SMALL = ["--synth_n=36", "--batch_size=6", "--log_interval=1", "--eval_interval=0", "--workers=0"]


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("synth")


def test_help_explains_every_flag(capsys):
    with pytest.raises(SystemExit):
        train.parse_args(["--help"])
    text = capsys.readouterr().out
    for f in train.fields(train.TrainConfig):
        assert f"--{f.name}" in text, f"--{f.name} missing from --help"


def test_bad_preset_is_rejected(tmp_path):
    with pytest.raises(SystemExit):
        train.parse_args(["--preset=huge", f"--out_dir={tmp_path}"])


def test_paper_preset_uses_adam_with_l2_and_tiny_adamw(tmp_path):
    out = f"--out_dir={tmp_path}"  # tests never read or write the working tree's out/
    assert train.parse_args(["--preset=paper", out]).optimizer == "adam"
    assert train.parse_args([out]).optimizer == "adamw"
    with pytest.raises(SystemExit):
        train.parse_args(["--optimizer=sgd", out])


@pytest.mark.parametrize("kind", ["adam", "adamw"])
def test_optimizer_update_equals_the_formula(kind, tmp_path):
    """Two steps in float64 against Adam's update written out: L2 (adam) puts wd * p into the
    gradient before the moments; decoupled (adamw) shrinks p by lr * wd outside them."""
    cfg = train.parse_args(["--preset=paper", f"--optimizer={kind}", "--weight_decay=0.1", f"--out_dir={tmp_path}",
                            "--lr=0.01"])
    torch.manual_seed(0)
    p0 = torch.randn(7, dtype=torch.float64)
    grads = [torch.randn(7, dtype=torch.float64) for _ in range(2)]
    p = torch.nn.Parameter(p0.clone())
    opt = train.make_optimizer([p], cfg, fused=False)
    for g in grads:
        p.grad = g.clone()
        opt.step()
    lr, (b1, b2), wd, eps = cfg.lr, train.TRAIN_PRESETS["paper"]["betas"], cfg.weight_decay, 1e-8
    ref, m, v = p0.clone(), torch.zeros(7, dtype=torch.float64), torch.zeros(7, dtype=torch.float64)
    for t, g in enumerate(grads, 1):
        if kind == "adam":
            g = g + wd * ref
        else:
            ref = ref * (1 - lr * wd)
        m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
        ref = ref - lr * (m / (1 - b1 ** t)) / ((v / (1 - b2 ** t)).sqrt() + eps)
    torch.testing.assert_close(p.detach(), ref, rtol=1e-12, atol=1e-12)


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
    assert set(saved["auc"]) == set(data_lib.CTRATE_CLASSES) and saved["trained_on"] == "synthetic"
    # the reported macro AUROC is the reference AUROC of the scores it wrote, class by class
    _, _, scores = read_score_csv(out / "scores.csv")
    _, _, labels = read_score_csv(out / "labels.csv")
    assert saved["macro_auc"] == pytest.approx(eval_lib.macro_auc(scores, labels), abs=1e-12)
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 40 and tuple(ckpt["model_config"]["image_size"]) == (48, 48, 32)
    # input centering: the stored mean is the training volumes' mean, not left at zero
    kept = torch.load(out / "best.pt", weights_only=True)["model"]["visual.input_mean"]
    cfg = train.parse_args(SMALL + [f"--synth_dir={synth_dir}", f"--out_dir={tmp_path / 'x'}"])
    fit = training_inputs(cfg, PRESETS["tiny"], 4096, log=lambda *a: None).train
    torch.testing.assert_close(kept[0], data_lib.mean_volume(fit))
    assert kept.abs().max() > 0.1


@pytest.fixture
def dropout(monkeypatch):
    """The tiny preset with dropout 0.1 in both encoders (the paper's text tower has it): a run that
    draws randomness every step, which a resume must reproduce."""
    monkeypatch.setitem(train.PRESETS, "tiny", replace(PRESETS["tiny"], dropout=0.1))


def test_resume_continues_the_same_run(synth_dir, tmp_path, dropout, monkeypatch):
    """A run resumed from its step-3 checkpoint continues as if never stopped: weights, losses and
    the validation record, with dropout (which draws from torch's RNG, restored on resume) and a
    warm-up + cosine schedule (which depends on the run's length, 6 steps in both)."""
    common = SMALL[:3] + SMALL[4:] + [f"--synth_dir={synth_dir}", "--ckpt_interval=3", "--max_iters=6",
                                      "--warmup_iters=2", "--eval_interval=2", "--val_fraction=0.2"]
    save = train.save_checkpoint

    def keep_step_3(path, model, opt, scaler, step, *rest):  # the checkpoint a stop at 3 leaves
        save(path, model, opt, scaler, step, *rest)
        if step == 3:  # the run's folder as it stood then: ckpt.pt and the best.pt of step 2
            shutil.copytree(tmp_path / "a", tmp_path / "b", ignore=shutil.ignore_patterns(".lock"))

    monkeypatch.setattr(train, "save_checkpoint", keep_step_3)
    straight = train.main(common + [f"--out_dir={tmp_path / 'a'}"])
    monkeypatch.setattr(train, "save_checkpoint", save)
    resumed = train.main(common + [f"--out_dir={tmp_path / 'b'}", "--resume"])
    assert resumed["history"] == straight["history"][3:]
    assert resumed["val_history"] == straight["val_history"] and len(straight["val_history"]) == 3
    a = torch.load(tmp_path / "a" / "ckpt.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "ckpt.pt", weights_only=True)
    assert a["model_config"]["dropout"] == 0.1 and a["step"] == b["step"] == 6
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), f"{k} differs after resume"


def test_validation_split_never_overlaps_the_held_out_split(synth_dir, tmp_path):
    """The validation reports come from the training split; a report's volumes stay together."""
    cfg = train.parse_args(SMALL + [f"--synth_dir={synth_dir}", f"--out_dir={tmp_path}",
                                    "--val_fraction=0.25"])
    inputs = training_inputs(cfg, PRESETS["tiny"], 4096)
    fit, val, held_out = inputs.train, inputs.val, inputs.held_out
    names = [{r.name for r in part} for part in (fit, val, held_out)]
    assert names[1] and not names[0] & names[1] and not names[1] & names[2]
    assert not names[0] & names[2] and all(n.startswith("train") for n in names[1])
    assert not {r.report for r in fit} & {r.report for r in val}
    reports = {r.report for r in fit + val}
    assert len({r.report for r in val}) == round(0.25 * len(reports))
    again = split_validation(fit + val, 0.25, cfg.seed)[1]
    assert {r.name for r in again} == names[1]  # a function of the seed
    assert {r.name for r in split_validation(fit + val, 0.25, cfg.seed + 1)[1]} != names[1]
    assert split_validation(fit, 0.0, 0) == (fit, [])


def test_the_kept_model_is_the_best_on_validation(synth_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(cmki, "USE_KERNELS", False)
    out = tmp_path / "run"
    result = train.main(SMALL[:3] + SMALL[4:] + [
        "--max_iters=8", "--eval_interval=2", "--val_fraction=0.2", "--warmup_iters=0",
        f"--synth_dir={synth_dir}", f"--out_dir={out}"])
    steps, scores = zip(*result["val_history"])
    assert steps == (2, 4, 6, 8)
    best = max(range(4), key=lambda i: (scores[i], -i))  # the first of equal scores is kept
    assert result["selected_step"] == steps[best] and result["val_macro_auc"] == scores[best]
    kept = torch.load(out / "best.pt", weights_only=True)
    assert kept["step"] == steps[best] and kept["val_macro_auc"] == scores[best]
    assert json.loads((out / "eval.json").read_text())["selected_step"] == steps[best]


def test_resume_without_checkpoint_names_the_file(synth_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="ckpt.pt"):
        train.main(SMALL + [f"--synth_dir={synth_dir}", f"--out_dir={tmp_path}", "--resume"])


def test_sigkill_then_resume_ends_with_the_uninterrupted_parameters(synth_dir, tmp_path, monkeypatch):
    """A run killed with SIGKILL mid-way and resumed (--resume=auto, as torchrun --max-restarts
    would rerun it) ends bitwise equal to an uninterrupted run, with a data-loader worker process."""
    monkeypatch.setattr(cmki, "USE_KERNELS", False)  # eager maths in both processes
    common = SMALL[:-1] + ["--workers=1", f"--synth_dir={synth_dir}", "--warmup_iters=0",
                           "--max_iters=5", "--ckpt_interval=1", "--resume=auto"]
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


# ----------------------------------------------------------------------------- DDP

def record_first_gradients(path):
    """Make train.make_optimizer's optimizer save every parameter's gradient (rank 0's) to `path`
    just before its first update: the step's gradients, all-reduced under DDP."""
    make = train.make_optimizer

    def recording(params, cfg, fused):
        params = list(params)
        opt = make(params, cfg, fused)
        step = opt.step

        def first(*args, **kwargs):
            if train.is_master() and not Path(path).exists():
                torch.save([p.grad.clone() for p in params], path)
            return step(*args, **kwargs)
        opt.step = first
        return opt
    train.make_optimizer = recording


def _rank(rank, world, port, args, grads):
    """One torchrun rank: the environment torchrun sets, then train.main as it runs there."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    cmki.USE_KERNELS = False  # eager maths in every rank: the comparison is about the plumbing
    torch.set_num_threads(1)
    record_first_gradients(grads)
    train.main(args)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("accum", [1, 2])
def test_two_ranks_train_like_one_process_on_the_global_batch(synth_dir, tmp_path, accum, monkeypatch):
    """train.main under 2 gloo ranks (each holds half of every batch; embeddings all-gathered, so
    the loss is the global batch's) against one process on the same batches: the same first loss
    and the same first gradients, up to float32 summation order."""
    monkeypatch.setattr(cmki, "USE_KERNELS", False)
    common = SMALL[:1] + ["--batch_size=8", "--log_interval=1", "--eval_interval=0", "--workers=0",
                          f"--synth_dir={synth_dir}", "--max_iters=1", "--warmup_iters=0",
                          f"--grad_accum={accum}", "--val_fraction=0"]
    monkeypatch.setattr(train, "make_optimizer", train.make_optimizer)  # undone after the test
    record_first_gradients(tmp_path / "one.pt")
    one = train.main(common + [f"--out_dir={tmp_path / 'one'}"])  # also makes the data set once
    ctx = mp.spawn(_rank, args=(2, free_port(), common + [f"--out_dir={tmp_path / 'two'}"],
                                str(tmp_path / "two.pt")), nprocs=2, join=False)
    deadline = time.time() + 180  # a rank stuck in a collective must fail the test, not hang it
    while not ctx.join(timeout=1):
        if time.time() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("the 2-rank run did not finish in 180 s")
    two = torch.load(tmp_path / "two" / "ckpt.pt", weights_only=True)
    assert two["step"] == 1
    g1, g2 = (torch.load(tmp_path / f, weights_only=True) for f in ("one.pt", "two.pt"))
    worst = max((a - b).abs().max().item() / (a.abs().max().item() + 1e-12) for a, b in zip(g1, g2))
    assert worst <= 1e-4, f"largest relative gradient difference {worst:.2e}"  # float32 sums
    json_two = json.loads((tmp_path / "two" / "eval.json").read_text())
    assert json_two["history"] == pytest.approx(one["history"], rel=1e-6)  # the global batch's loss


def test_gather_is_identity_without_a_process_group():
    x = torch.randn(3, 4, requires_grad=True)
    assert train.gather(x) is x and train.is_master() and not train.any_rank(None)


def test_rank_batches_partition_each_step():
    """Every rank and micro-batch together cover each step's global batch once, in order."""
    one = data_lib.rank_batches(40, 8, 5, 3)
    ranks = [data_lib.rank_batches(40, 8, 5, 3, r, 2, 2) for r in range(2)]
    for _ in range(7):  # crosses an epoch boundary (5 steps per epoch)
        want = next(one)
        got = [next(ranks[r]) for r in range(2)] + [next(ranks[r]) for r in range(2)]
        assert [x for part in got for x in part] == want


def test_help_lists_every_flag_with_its_default(capsys, help_lacks_defaults):
    with pytest.raises(SystemExit):
        train.parse_args(["--help"])
    out = capsys.readouterr().out
    assert "--summaries" in out and help_lacks_defaults(out) == []
    assert len(train.fields(train.TrainConfig)) <= 30  # the flags a learner has to read
REPO = Path(train.__file__).parent


def run_cli(*args, timeout=120):
    """train.py as a user runs it -> CompletedProcess (text)."""
    return subprocess.run([sys.executable, "train.py", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.parametrize("flag, message", [
    ("--max_iters=-1", "--max_iters must be >= 1, got -1"),
    ("--max_iters=0", "--max_iters must be >= 1, got 0"),
    ("--batch_size=-4", "--batch_size must be >= 1, got -4"),
    ("--grad_accum=0", "--grad_accum must be >= 1, got 0"),
    ("--ckpt_interval=0", "--ckpt_interval must be >= 1, got 0"),
    ("--log_interval=0", "--log_interval must be >= 1, got 0"),
    ("--eval_interval=-1", "--eval_interval must be >= 0, got -1"),
    ("--epochs=0", "--epochs must be >= 1, got 0"),
    ("--val_fraction=1", "--val_fraction must be in [0, 1), got 1.0"),
    ("--method=bank_only", "--method must be one of ['brgsa', 'clip', 'no_mse', 'no_info_r'], got 'bank_only'"),
    ("--lr=0", "--lr must be > 0, got 0.0"),
    ("--dtype=float64", "--dtype must be one of ['auto', 'bfloat16', 'float16', 'float32'], got 'float64'"),
    ("--summaries=gpt", "--summaries gpt: neither rules nor rules_report nor a summary cache file"),
    ("--device=tpu", "--device: expected auto, cpu, cuda or cuda:N, got 'tpu'"),
    ("--batch_size=6", "--batch_size=6 must be a multiple of world size 1 x --grad_accum=4"),
])
def test_bad_flags_are_refused_before_any_work(flag, message, tmp_path, capsys):
    args = [flag, f"--out_dir={tmp_path / 'run'}"] + (["--grad_accum=4"] if "6" in flag else [])
    with pytest.raises(SystemExit) as exit_:
        train.parse_args(args)
    assert exit_.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_cuda_device_without_a_gpu_is_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit):
        train.parse_args(["--device=cuda", f"--out_dir={tmp_path}"])
    assert "--device cuda: no CUDA GPU is available here" in capsys.readouterr().err


def test_new_run_refuses_to_overwrite_a_checkpoint(tmp_path, capsys):
    (tmp_path / "ckpt.pt").write_bytes(b"a trained model")
    with pytest.raises(SystemExit) as exit_:
        train.parse_args([f"--out_dir={tmp_path}", "--max_iters=1"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and f"--out_dir {tmp_path} already holds a checkpoint" in err
    assert "--resume" in err and (tmp_path / "ckpt.pt").read_bytes() == b"a trained model"
    train.parse_args([f"--out_dir={tmp_path}", "--resume"])  # continuing it is allowed
    train.parse_args([f"--out_dir={tmp_path}", "--resume=auto"])


def test_cli_refusals_exit_nonzero_without_a_traceback(tmp_path):
    """As a user sees them: a bad flag, an overwrite, a corrupt checkpoint under --resume=auto."""
    res = run_cli("--max_iters=-1", f"--out_dir={tmp_path / 'a'}")
    assert res.returncode == 2 and "--max_iters must be >= 1" in res.stderr
    assert "Traceback" not in res.stderr and not (tmp_path / "a").exists()
    (tmp_path / "ckpt.pt").write_bytes(b"PK\x03\x04 torn")  # a zip header, then nothing
    res = run_cli(f"--out_dir={tmp_path}")
    assert res.returncode == 2 and "already holds a checkpoint" in res.stderr
    res = run_cli(f"--out_dir={tmp_path}", "--resume=auto")
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr
    assert f"cannot resume: {tmp_path / 'ckpt.pt'}: corrupt or truncated checkpoint" in res.stderr
    assert "weights_only=False" not in res.stderr and "move it away" in res.stderr


def fake_checkpoint(path, model_config, **extra):
    ckpt = dict(model={}, model_config=model_config, tokenizer="", optimizer={}, scaler={}, step=1,
                rng={}, last_eval=None, **extra)
    torch.save(ckpt, path)


def test_resume_checks_the_checkpoint_before_any_data_work(tmp_path):
    """Another preset, an unknown config field, no training state: each named, nothing else done."""
    from dataclasses import asdict
    path = tmp_path / "ckpt.pt"
    fake_checkpoint(path, asdict(PRESETS["tiny"]))
    with pytest.raises(ValueError, match=r"trained with another model config: image_size "
                                         r"\(48, 48, 32\) \(checkpoint\) vs \(256, 256, 128\) \(now\)"):
        files.read_checkpoint(path, resume_with=PRESETS["paper"])
    assert files.read_checkpoint(path, resume_with=PRESETS["tiny"])["step"] == 1
    fake_checkpoint(path, dict(asdict(PRESETS["tiny"]), moe_experts=8))
    with pytest.raises(ValueError, match=r"model_config has field\(s\) \['moe_experts'\]"):
        files.read_checkpoint(path, resume_with=PRESETS["tiny"])
    torch.save(dict(model={}, model_config=asdict(PRESETS["tiny"]), tokenizer=""), path)
    with pytest.raises(ValueError, match="holds no training state"):
        files.read_checkpoint(path, resume_with=PRESETS["tiny"])


def test_training_needs_reports():
    from data import Record
    rec = [Record(f"v{i}", "x.npy", text, None) for i, text in enumerate(["", "  ", "nodule."])]
    said = []
    assert [r.name for r in with_reports(rec, "D", said.append)] == ["v2"]
    assert "2 training volumes have an empty report" in said[0]
    with pytest.raises(ValueError, match=r"D: none of the 2 training volumes has a report"):
        with_reports(rec[:2], "D", said.append)


def test_summaries_come_from_a_finished_cache_or_stop_the_run(tmp_path):
    """A cache written by `python -m prepare.summarize` (any backend, an LLM's too) serves the run
    as it is; a report it lacks stops the run with the command that completes it."""
    from prepare import summarize
    reports = ["Small nodule.", "Pleural fluid.", "Emphysema."]
    cache = tmp_path / "made_by_summarize.jsonl"
    cache.write_text("".join(json.dumps(dict(key=summarize.report_key(r), source="llm:my-model",
                                             summary=[f"S {r}"])) + "\n" for r in reports[:2]))
    assert summaries_of(str(cache), reports[:2], None, tmp_path) == {r: [f"S {r}"] for r in reports[:2]}
    with pytest.raises(ValueError, match=r"1 of 3 reports have no summary in .*made_by_summarize\.jsonl; "
                                         r"complete it with python -m prepare\.summarize"):
        summaries_of(str(cache), reports, None, tmp_path)
    assert summaries_of("rules", reports, None, tmp_path)[reports[2]] == ["Emphysema."]


# ----------------------------------------------------------------------------- the schedule and clipping

def test_lr_warms_up_then_decays_to_a_tenth(tmp_path):
    cfg = train.parse_args(["--lr=1e-3", "--warmup_iters=4", "--max_iters=24", f"--out_dir={tmp_path}"])
    lrs = [train.lr_at(s, cfg) for s in range(30)]
    assert lrs[:4] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3])  # linear warm-up
    for step in (4, 10, 14, 20):  # cosine from lr down to its 10% floor over the remaining steps
        want = 1e-4 + 0.9e-3 * 0.5 * (1 + math.cos(math.pi * (step - 4) / 20))
        assert lrs[step] == pytest.approx(want, rel=1e-12)
    assert lrs[24:] == pytest.approx([1e-4] * 6)  # the floor, also past max_iters
    assert train.lr_at(7, replace(cfg, warmup_iters=0)) == 1e-3  # the paper's constant LR


def test_gradients_are_clipped_before_the_update(synth_dir, tmp_path, monkeypatch):
    """Clipped to a global norm of 1e-12, the gradient is swamped by Adam's eps = 1e-8: each step
    moves a weight by ~1e-4 of lr instead of ~lr, so two steps from the same start end far apart
    from an unclipped run (and identical to it if clipping did nothing)."""
    monkeypatch.setattr(cmki, "USE_KERNELS", False)
    args = SMALL + [f"--synth_dir={synth_dir}", "--max_iters=2", "--warmup_iters=0", "--val_fraction=0"]
    head = {}
    for clip in ("1e-12", "0"):
        train.main(args + [f"--grad_clip={clip}", f"--out_dir={tmp_path / clip}"])
        head[clip] = torch.load(tmp_path / clip / "ckpt.pt", weights_only=True)["model"]["visual.head.weight"]
    lr = train.TRAIN_PRESETS["tiny"]["lr"]
    assert (head["1e-12"] - head["0"]).abs().max().item() > lr  # ~2 lr: two unclipped Adam steps


# ----------------------------------------------------------------------------- stops, locks, full disks

def popen_train(args, **kw):
    """train.py in a subprocess with eager maths (no interpreter), as a user or a scheduler runs it."""
    env = dict(os.environ, TRITON_INTERPRET="0")
    return subprocess.Popen([sys.executable, "train.py", *args], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)


def wait_for_step(proc, step: int, timeout: float = 120):
    """Read the run's stdout until its progress line for `step` (or later) appears."""
    deadline = time.time() + timeout
    for line in proc.stdout:
        if line.startswith("step") and "/" in line and int(line.split()[1].split("/")[0]) >= step:
            return
        assert time.time() < deadline, "no progress within the time limit"
    pytest.fail(f"the run ended before step {step}: {proc.stderr.read()[-2000:]}")


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_ctrl_c_or_sigterm_saves_a_checkpoint_that_resumes_the_same_run(synth_dir, tmp_path, sig,
                                                                         code, monkeypatch):
    """Stopped mid-run, train.py finishes its step, saves ckpt.pt, prints the resume command and
    exits 128 + signal, without a traceback; resuming ends bitwise equal to an uninterrupted run."""
    monkeypatch.setattr(cmki, "USE_KERNELS", False)
    common = SMALL + [f"--synth_dir={synth_dir}", "--warmup_iters=0", "--max_iters=40",
                      "--ckpt_interval=1000", "--val_fraction=0"]
    proc = popen_train(common + [f"--out_dir={tmp_path / 'b'}"])
    wait_for_step(proc, 2)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code and "Traceback" not in err, err
    assert "Continue with: python train.py" in err and "--resume" in err
    stopped = torch.load(tmp_path / "b" / "ckpt.pt", weights_only=True)["step"]
    assert 2 <= stopped < 40
    resumed = train.main(common + [f"--out_dir={tmp_path / 'b'}", "--resume"])
    straight = train.main(common + [f"--out_dir={tmp_path / 'a'}"])
    assert resumed["history"] == straight["history"][stopped:]
    a, b = (torch.load(tmp_path / d / "ckpt.pt", weights_only=True)["model"] for d in "ab")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_second_run_into_the_same_folder_is_refused(tmp_path):
    """While one run holds out_dir, another refuses at once naming it; a lock whose process is gone
    (a crashed run) is recognised and taken over."""
    with files.run_lock(tmp_path / ".lock", "train.py"):
        res = run_cli(f"--out_dir={tmp_path}", "--synth_n=36", "--max_iters=1")
        assert res.returncode == 1 and "Traceback" not in res.stderr
        assert f"{tmp_path} is in use by another train.py run (pid {os.getpid()}" in res.stderr
    assert not (tmp_path / ".lock").exists()  # released
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    (tmp_path / ".lock").write_text(json.dumps(dict(pid=int(dead), host=socket.gethostname(),
                                                    started="then", command="train.py")))
    with files.run_lock(tmp_path / ".lock", "train.py") as lock:
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    # a run killed between creating its lock and writing it: held for a minute, then taken over
    (tmp_path / ".lock").write_text("")
    with pytest.raises(ValueError, match="in use by another train.py run"):
        with files.run_lock(tmp_path / ".lock", "train.py"):
            pass
    os.utime(tmp_path / ".lock", (time.time() - 120, time.time() - 120))
    with files.run_lock(tmp_path / ".lock", "train.py") as lock:
        assert json.loads(lock.read_text())["pid"] == os.getpid()


def _fsize_limit(nbytes):
    def limit():  # in the child: writes past nbytes fail with EFBIG instead of killing the process
        import resource
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, nbytes))
    return limit


def test_a_full_disk_while_saving_names_the_file_and_keeps_the_previous_checkpoint(synth_dir, tmp_path):
    common = SMALL + [f"--synth_dir={synth_dir}", "--warmup_iters=0", "--val_fraction=0",
                      f"--out_dir={tmp_path}"]
    res = subprocess.run([sys.executable, "train.py", *common, "--max_iters=2"], cwd=REPO,
                         env=dict(os.environ, TRITON_INTERPRET="0"), capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    before = (tmp_path / "ckpt.pt").read_bytes()
    proc = popen_train(common + ["--max_iters=3", "--resume"],
                       preexec_fn=_fsize_limit(len(before) // 2))
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1 and "Traceback" not in err, err
    assert f"{tmp_path / 'ckpt.pt'}: could not be written (file too large)" in err
    assert (tmp_path / "ckpt.pt").read_bytes() == before  # intact, and still loadable:
    assert files.read_checkpoint(tmp_path / "ckpt.pt")["step"] == 2
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # no torn temp file left
