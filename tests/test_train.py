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


# ----------------------------------------------------------------------------- DDP

# A very small model in float64: the point is the gradient plumbing, not the encoders, and float64
# makes "equal" mean equal up to summation order (1e-10), not up to float32 noise.
CFG = replace(PRESETS["tiny"], input_centering=False, crop_size=(16, 16, 8), patch_size=(8, 8, 4), vit_width=32,
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
