"""Data-parallel plumbing for train.py: torchrun environment -> process group, gathers, rank-0 work.

    torchrun --standalone --nproc_per_node=2 train.py ...     # launches 2 ranks; this file does the rest

torchrun sets RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT for every process; without
them train.py runs as one plain process and every helper here degrades to a no-op. Backends: NCCL
when the ranks train on CUDA devices, gloo on CPU (which is how the tests run two ranks).

The contrastive losses need every rank's embeddings as negatives (as open_clip does): `gather`
concatenates them with gradient, so each rank computes the loss of the whole global batch.
"""
import os
import warnings
from contextlib import contextmanager

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn

# PyTorch 2.13 marks torch.distributed.nn.functional.all_gather deprecated in favour of a private
# functional-collectives API; the public one still works (gloo and NCCL, with gradient), so keep it
# and do not print the warning at every step.
warnings.filterwarnings("ignore", message=".*all_gather is deprecated", category=FutureWarning)


def launched() -> bool:
    """True in a process started by torchrun (or anything else that sets RANK and WORLD_SIZE)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def setup(device: str) -> tuple:
    """Join the process group when launched by torchrun -> (rank, world_size, torch.device).

    device is train.py's --device: 'auto' means this rank's GPU (LOCAL_RANK) when CUDA is there.
    """
    if not launched():
        return 0, 1, torch.device(("cuda" if torch.cuda.is_available() else "cpu")
                                  if device == "auto" else device)
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    cuda = torch.cuda.is_available() and device in ("auto", "cuda")
    dev = torch.device(f"cuda:{local_rank}") if cuda else torch.device(device if device != "auto" else "cpu")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo",
                                device_id=dev if dev.type == "cuda" else None)
    return dist.get_rank(), dist.get_world_size(), dev


def teardown(clean: bool = True):
    """Leave the process group. clean: wait for every rank first, so none exits while others still
    talk to it; after an error there is no such wait (the other ranks may never reach it)."""
    if dist.is_initialized():
        if clean:
            dist.barrier()
        dist.destroy_process_group()


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_master() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def barrier():
    if dist.is_initialized():
        dist.barrier()


@contextmanager
def master_first():
    """Rank 0 runs the block first (data generation, preprocessing: writes to shared caches);
    the other ranks wait, then run it and find the caches filled."""
    if not is_master():
        barrier()
    yield
    if is_master():
        barrier()


def broadcast(obj):
    """Rank 0's picklable object on every rank (the tokenizer and summaries: built once)."""
    if not dist.is_initialized():
        return obj
    box = [obj if is_master() else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(x: torch.Tensor) -> torch.Tensor:
    """(b, d) on each rank -> (world * b, d) in rank order, differentiable.

    Why the gradient comes out exact: every rank computes the *same* global loss L on the gathered
    batch. all_gather's backward sums the incoming gradients of all ranks for this rank's slice,
    giving world * dL/dx_local; DistributedDataParallel then averages parameter gradients over the
    ranks, dividing the world factor out again, so each parameter receives exactly dL/dtheta of the
    single-process loss on the concatenated batch. (Parameters used only in the loss, the bank D,
    get dL/dD on every rank; the average leaves it unchanged.)
    """
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return x
    return torch.cat(dist_fn.all_gather(x), dim=0)

