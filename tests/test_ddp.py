"""ddp.py + train.py's data-parallel step: 2 gloo processes give the gradients of 1 process on the
same global batch (all-gathered negatives), with and without gradient accumulation."""
import os
import socket
import time
from contextlib import nullcontext
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
import torch.multiprocessing as mp

import cmki
import ddp
import train
from model import PRESETS, BrgSA

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
    r, w, device = ddp.setup("cpu")  # exactly what train.main does under torchrun
    assert (r, w, device.type) == (rank, world, "cpu") and ddp.world_size() == world
    torch.manual_seed(rank)  # different init per rank: DDP must broadcast rank 0's parameters
    model = BrgSA(CFG).double()
    wrapped = torch.nn.parallel.DistributedDataParallel(model)
    results = {}
    for accum in (1, 2):
        model.zero_grad(set_to_none=True)
        results[accum] = step_grads(model, wrapped, wrapped.no_sync, rank, world, accum)
    if rank == 0:
        torch.save(dict(results=results, state=model.state_dict()), path)
    ddp.teardown()


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
    assert ddp.gather(x) is x and ddp.world_size() == 1 and ddp.is_master()
    assert ddp.broadcast({"a": 1}) == {"a": 1}


def test_rank_batches_partition_each_step():
    """Every rank and micro-batch together cover each step's global batch once, in order."""
    one = train.rank_batches(40, 8, 5, 3)
    ranks = [train.rank_batches(40, 8, 5, 3, r, 2, 2) for r in range(2)]
    for _ in range(7):  # crosses an epoch boundary (5 steps per epoch)
        want = next(one)
        got = [next(ranks[r]) for r in range(2)] + [next(ranks[r]) for r in range(2)]
        assert [x for part in got for x in part] == want
