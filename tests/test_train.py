"""train.py: a short run lowers the loss and writes eval.json; resume continues the same run exactly;
the data-parallel step: 2 gloo processes give the gradients of 1 process on the same global batch
(all-gathered negatives), with and without gradient accumulation."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.multiprocessing as mp

import cmki
import train
from model import PRESETS, BrgSA

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


def test_paper_preset_uses_adam_with_l2_and_tiny_adamw():
    assert train.parse_args(["--preset=paper"]).optimizer == "adam"
    assert train.parse_args([]).optimizer == "adamw"
    with pytest.raises(SystemExit):
        train.parse_args(["--optimizer=sgd"])


@pytest.mark.parametrize("kind", ["adam", "adamw"])
def test_optimizer_update_equals_the_formula(kind):
    """Two steps in float64 against Adam's update written out: L2 (adam) puts wd * p into the
    gradient before the moments; decoupled (adamw) shrinks p by lr * wd outside them."""
    cfg = train.parse_args(["--preset=paper", f"--optimizer={kind}", "--weight_decay=0.1",
                            "--lr=0.01"])
    torch.manual_seed(0)
    p0 = torch.randn(7, dtype=torch.float64)
    grads = [torch.randn(7, dtype=torch.float64) for _ in range(2)]
    p = torch.nn.Parameter(p0.clone())
    opt = train.make_optimizer([p], cfg, fused=False)
    for g in grads:
        p.grad = g.clone()
        opt.step()
    lr, (b1, b2), wd, eps = cfg.lr, (cfg.beta1, cfg.beta2), cfg.weight_decay, 1e-8
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
    assert set(saved["auc"]) == set(train.data_lib.CTRATE_CLASSES)
    assert 0.0 <= saved["macro_auc"] <= 1.0
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 40 and tuple(ckpt["model_config"]["image_size"]) == (48, 48, 32)


def test_resume_continues_the_same_run(synth_dir, tmp_path):
    """Weights and the validation record continue as if never stopped."""
    common = SMALL[:3] + SMALL[4:] + [f"--synth_dir={synth_dir}", "--ckpt_interval=3",
                                      "--warmup_iters=0", "--eval_interval=2", "--val_fraction=0.2"]
    straight = train.main(common + ["--max_iters=6", f"--out_dir={tmp_path / 'a'}"])
    train.main(common + ["--max_iters=3", f"--out_dir={tmp_path / 'b'}"])
    resumed = train.main(common + ["--max_iters=6", f"--out_dir={tmp_path / 'b'}", "--resume"])
    assert resumed["history"] == straight["history"][3:]
    # the first run ended at step 3, so it also validated there; every other entry is the same
    assert [h for h in resumed["val_history"] if h[0] != 3] == straight["val_history"]
    assert [h[0] for h in straight["val_history"]] == [2, 4, 6]
    a = torch.load(tmp_path / "a" / "ckpt.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "ckpt.pt", weights_only=True)
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), f"{k} differs after resume"


def test_validation_split_never_overlaps_the_held_out_split(synth_dir, tmp_path):
    """The validation reports come from the training split; a report's volumes stay together."""
    cfg = train.parse_args(SMALL + [f"--synth_dir={synth_dir}", f"--out_dir={tmp_path}",
                                    "--val_fraction=0.25"])
    _, _, (fit, val, held_out), _, _ = train.prepare(cfg, True, torch.device("cpu"), 0, print)
    names = [{r.name for r in part} for part in (fit, val, held_out)]
    assert names[1] and not names[0] & names[1] and not names[1] & names[2]
    assert not names[0] & names[2] and all(n.startswith("train") for n in names[1])
    assert not {r.report for r in fit} & {r.report for r in val}
    reports = {r.report for r in fit + val}
    assert len({r.report for r in val}) == round(0.25 * len(reports))
    again = train.split_validation(fit + val, 0.25, cfg.seed)[1]
    assert {r.name for r in again} == names[1]  # a function of the seed
    assert {r.name for r in train.split_validation(fit + val, 0.25, cfg.seed + 1)[1]} != names[1]
    assert train.split_validation(fit, 0.0, 0) == (fit, [])


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


# ----------------------------------------------------------------------------- DDP

# A very small model in float64: the point is the gradient plumbing, not the encoders, and float64
# makes "equal" mean equal up to summation order (1e-10), not up to float32 noise.
CFG = replace(PRESETS["tiny"], input_centering=False, image_size=(16, 16, 8), crop_size=(16, 16, 8),
              patch_size=(8, 8, 4), vit_width=32,
              vit_depth=1, vit_heads=2, vocab_size=50, max_len=12, text_width=32, text_depth=1,
              text_heads=2, text_mlp=64, embed_dim=24, bank_size=16)
GLOBAL_BATCH = 8


def global_batch():
    g = torch.Generator().manual_seed(3)
    volume = torch.randn(GLOBAL_BATCH, 1, *CFG.crop_size, generator=g, dtype=torch.float64)
    ids = torch.randint(1, CFG.vocab_size, (GLOBAL_BATCH, CFG.max_len), generator=g)
    mask = (torch.arange(CFG.max_len) < torch.randint(3, CFG.max_len + 1, (GLOBAL_BATCH, 1),
                                                       generator=g)).long()
    return volume, ids, mask


def micro_batches(rank, world, accum):
    """The slices rank `rank` sees, in train.rank_batches' order."""
    volume, ids, mask = global_batch()
    out, gen = [], train.rank_batches(GLOBAL_BATCH, GLOBAL_BATCH, 0, 0, rank, world, accum)
    for _ in range(accum):
        rows = [i for _, i in next(gen)]
        out.append((volume[rows], ids[rows], mask[rows]))
    return out


def step_grads(model, wrapped, no_sync, rank, world, accum):
    cfg = SimpleNamespace(grad_accum=accum)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    losses = train.train_step(model, wrapped, iter(micro_batches(rank, world, accum)), cfg,
                              torch.device("cpu"), torch.float32, scaler, no_sync)
    return losses["total"].item(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _worker(rank, world, port, path):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    cmki.USE_KERNELS = False  # eager maths in every rank: the comparison is about the plumbing
    torch.set_num_threads(1)
    r, w, device = train.ddp_setup("cpu")  # exactly what train.main does under torchrun
    assert (r, w, device.type) == (rank, world, "cpu") and torch.distributed.get_world_size() == world
    torch.manual_seed(rank)  # different init per rank: DDP must broadcast rank 0's parameters
    model = BrgSA(CFG).double()
    wrapped = torch.nn.parallel.DistributedDataParallel(model)
    results = {}
    for accum in (1, 2):
        model.zero_grad(set_to_none=True)
        results[accum] = step_grads(model, wrapped, wrapped.no_sync, rank, world, accum)
    if rank == 0:
        torch.save(dict(results=results, state=model.state_dict()), path)
    train.ddp_teardown()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory):
    path = tmp_path_factory.mktemp("ddp") / "rank0.pt"
    ctx = mp.spawn(_worker, args=(2, free_port(), str(path)), nprocs=2, join=False)
    deadline = time.time() + 120  # a rank stuck in a collective must fail the test, not hang it
    while not ctx.join(timeout=1):
        if time.time() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("the 2-rank run did not finish in 120 s")
    return torch.load(path, weights_only=True)


@pytest.mark.parametrize("accum", [1, 2])
def test_two_ranks_match_one_process_on_the_global_batch(two_rank_results, accum, monkeypatch):
    got_loss, got_grads = two_rank_results["results"][accum]
    monkeypatch.setattr(cmki, "USE_KERNELS", False)
    model = BrgSA(CFG).double()
    model.load_state_dict(two_rank_results["state"])  # rank 0's init (no optimizer step taken)
    loss, grads = step_grads(model, model, nullcontext, 0, 1, accum)
    assert abs(loss - got_loss) <= 1e-12 * abs(loss), (loss, got_loss)
    worst = max(((grads[n] - g).abs().max().item() / (grads[n].abs().max().item() + 1e-12), n)
                for n, g in got_grads.items())
    assert worst[0] <= 1e-10, f"largest relative gradient difference {worst[0]:.2e} in {worst[1]}"
    # the gather really happened: rank 0's half batch alone has another loss
    model.zero_grad()
    half, _ = step_grads(model, model, nullcontext, 0, 2, accum)
    assert abs(half - got_loss) > 1e-3


def test_gather_is_identity_without_a_process_group():
    x = torch.randn(3, 4, requires_grad=True)
    assert train.gather(x) is x and train.is_master()
    assert train.broadcast({"a": 1}) == {"a": 1}


def test_rank_batches_partition_each_step():
    """Every rank and micro-batch together cover each step's global batch once, in order."""
    one = train.rank_batches(40, 8, 5, 3)
    ranks = [train.rank_batches(40, 8, 5, 3, r, 2, 2) for r in range(2)]
    for _ in range(7):  # crosses an epoch boundary (5 steps per epoch)
        want = next(one)
        got = [next(ranks[r]) for r in range(2)] + [next(ranks[r]) for r in range(2)]
        assert [x for part in got for x in part] == want


def test_help_lists_every_flag_with_its_default(capsys, help_lacks_defaults):
    with pytest.raises(SystemExit):
        train.parse_args(["--help"])
    out = capsys.readouterr().out
    assert "--tokenizer" in out and help_lacks_defaults(out) == []
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
    ("--summary_backend=gpt", "--summary_backend must be one of ['rules', 'rules_report', 'llm'], got 'gpt'"),
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
    train.parse_args([f"--out_dir={tmp_path}", "--auto_resume"])


def test_cli_refusals_exit_nonzero_without_a_traceback(tmp_path):
    """As a user sees them: a bad flag, an overwrite, a corrupt checkpoint under --auto_resume."""
    res = run_cli("--max_iters=-1", f"--out_dir={tmp_path / 'a'}")
    assert res.returncode == 2 and "--max_iters must be >= 1" in res.stderr
    assert "Traceback" not in res.stderr and not (tmp_path / "a").exists()
    (tmp_path / "ckpt.pt").write_bytes(b"PK\x03\x04 torn")  # a zip header, then nothing
    res = run_cli(f"--out_dir={tmp_path}")
    assert res.returncode == 2 and "already holds a checkpoint" in res.stderr
    res = run_cli(f"--out_dir={tmp_path}", "--auto_resume")
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
        train.read_resume_checkpoint(path, PRESETS["paper"])
    assert train.read_resume_checkpoint(path, PRESETS["tiny"])["step"] == 1
    fake_checkpoint(path, dict(asdict(PRESETS["tiny"]), moe_experts=8))
    with pytest.raises(ValueError, match=r"model_config has field\(s\) \['moe_experts'\]"):
        train.read_resume_checkpoint(path, PRESETS["tiny"])
    torch.save(dict(model={}, model_config=asdict(PRESETS["tiny"]), tokenizer=""), path)
    with pytest.raises(ValueError, match="holds no training state"):
        train.read_resume_checkpoint(path, PRESETS["tiny"])


def test_training_needs_reports():
    from data import Record
    rec = [Record(f"v{i}", "x.npy", text, None) for i, text in enumerate(["", "  ", "nodule."])]
    said = []
    assert [r.name for r in train.with_reports(rec, "D", said.append)] == ["v2"]
    assert "2 training volumes have an empty report" in said[0]
    with pytest.raises(ValueError, match=r"D: none of the 2 training volumes has a report"):
        train.with_reports(rec[:2], "D", said.append)


def _refused_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}/v1"


def test_llm_summaries_reuse_a_cache_made_with_another_model(tmp_path):
    """A cache written by `python -m prepare.summarize --model my-model` serves train.py with
    --llm_model my-model: nothing is sent to the (here unreachable) server."""
    from prepare import summarize
    reports = ["Small nodule.", "Pleural fluid."]
    cache = tmp_path / "made_by_summarize.jsonl"
    cache.write_text("".join(json.dumps(dict(key=summarize.report_key(r), source="llm:my-model",
                                             summary=[f"S {r}"])) + "\n" for r in reports))
    cfg = train.parse_args(["--summary_backend=llm", "--llm_model=my-model", f"--llm_url={_refused_url()}",
                            f"--summary_cache={cache}", f"--out_dir={tmp_path / 'run'}"])
    assert train.summaries_of(cfg, reports, None, tmp_path / "run") == {r: [f"S {r}"] for r in reports}


def test_llm_server_down_stops_training_unless_told_to_fall_back(tmp_path, capsys):
    reports = ["Small nodule.", "Pleural fluid.", "Emphysema."]
    args = ["--summary_backend=llm", f"--llm_url={_refused_url()}", f"--out_dir={tmp_path}"]
    start = time.monotonic()
    with pytest.raises(ValueError, match=r"3 of 3 reports have no summary in .*summaries_llm\.jsonl.*"
                                         r"--summary_fallback"):
        train.summaries_of(train.parse_args(args), reports, None, tmp_path)
    assert "connection refused" in capsys.readouterr().err and time.monotonic() - start < 10
    assert train.summaries_of(train.parse_args(args + ["--summary_fallback"]), reports, None, tmp_path) == {}
    assert "3 of 3 reports have no summary; their raw text is used" in capsys.readouterr().out
    many = [f"Report {i}." for i in range(30)]
    with pytest.raises(ValueError, match=r"summarization \(llm, http://127.*stopped after 10 reports"):
        train.summaries_of(train.parse_args(args), many, None, tmp_path)
