"""Launch plans for the kernels: candidate configurations, bank-split plans, and the choice among
candidates by timing them on the GPU at first use (no op of its own; not on the reading path).

    python -m kernels.aot      # compiles every candidate below for sm_90: registers, spills, shared memory

kernels/bank_attention.py and kernels/similarity.py read as if each kernel had one configuration:
the first candidate of its list, which is what runs without a GPU (the interpreter, kernels.aot's
recorded launches). On a CUDA device the first call with a new (kernel, device, dtype, shape class)
times every candidate of the list once and keeps the fastest for the rest of the process (a
candidate that cannot run there, e.g. for want of shared memory on a smaller GPU, is passed over).
BRGSA_KERNEL_TUNING=0 keeps the first candidate everywhere; during CUDA-graph capture nothing is timed.

Why a list and not one configuration: at d = 768 a program holds a (BLOCK_M, d) fp32 accumulator
(192 registers a thread for 64 rows and 8 warps) and its held rows in shared memory (96 KB for 64 bf16
rows), so only a few tile shapes fit the register file and the H100's 227 KB; which of those is
fastest depends on N, K and the card (wider bank tiles give larger MMAs but fewer pipeline stages,
16-row blocks give more programs at small N), and measuring it once costs milliseconds. Every
candidate is compiled by kernels.aot with 0 spill bytes and within 227 KB of shared memory
(tests/test_kernels_aot.py), 16-bit and fp32 alike. The lists follow the shapes that split-KV decode
kernels (FlashDecoding, lightllm / SGLang's MLA decode: 16 query rows by 32-64 keys, a 512-wide head,
4 warps, 2 stages) and FlashAttention-style forwards (64 rows, 8 warps) use.
"""
import functools
import os
import statistics
import time
from typing import Callable, NamedTuple

import torch

from kernels.tiles import constexprs


class Config(NamedTuple):
    BLOCK_M: int     # rows held by one program (x in bank attention, a in the contrastive loss)
    BLOCK_N: int     # entries per tile of the operand walked over (bank entries, columns of b)
    num_warps: int
    num_stages: int  # software-pipelining depth of the tile loads in the walk

    def __str__(self):
        return f"M{self.BLOCK_M}/N{self.BLOCK_N}/w{self.num_warps}/s{self.num_stages}"


C = Config
# kernel -> {(wide: d > 256, fp32 inputs): candidates}, the first one the default. A "wide" program
# holds d as 3-4 chunks of 256 columns; narrow widths are one chunk of at most 256. Each list keeps
# the configurations that compile for sm_90 with 0 spill bytes and fit in 227 KB (python -m
# kernels.aot) under Triton 3.6 and 3.7; at d = 768 16-bit, e.g., 64 rows x 32 entries spills in the
# forward, the logit kernels of the contrastive loss cannot pipeline 128 held rows, and the fp32
# backward at 16 x 16 spills under Triton 3.6 only.
CANDIDATES = {
    # single-pass forward over the whole bank (N large enough to fill the GPU with row blocks)
    "bank.fwd": {(True, False): [C(64, 16, 8, 2), C(64, 16, 8, 3), C(32, 32, 8, 2)],
                 (True, True): [C(16, 16, 8, 2), C(16, 32, 8, 2)],
                 (False, False): [C(64, 64, 4, 2), C(128, 64, 8, 2), C(64, 32, 4, 3)],
                 (False, True): [C(32, 64, 8, 1), C(32, 32, 4, 2), C(16, 64, 4, 2)]},
    # the same walk over a slice of the bank (small N: flash-decoding); 16-row blocks give 4x the programs
    "bank.split": {(True, False): [C(64, 16, 8, 2), C(16, 32, 4, 2), C(16, 64, 8, 2), C(32, 32, 8, 2)],
                   (True, True): [C(16, 16, 8, 2), C(16, 32, 8, 2)],
                   (False, False): [C(64, 64, 4, 2), C(16, 64, 4, 2), C(16, 128, 4, 2)],
                   (False, True): [C(16, 64, 4, 2), C(32, 32, 4, 2), C(32, 64, 8, 1)]},
    # backward: holds x and dO (2 * BLOCK_M * d), recomputes S and dP per bank tile
    "bank.bwd": {(True, False): [C(64, 16, 4, 1), C(32, 32, 4, 2), C(32, 64, 4, 1)],
                 (True, True): [C(16, 32, 4, 1), C(16, 32, 4, 2)],
                 (False, False): [C(64, 64, 4, 2), C(64, 32, 4, 3), C(32, 64, 4, 2)],
                 (False, True): [C(32, 64, 4, 1), C(16, 64, 4, 2), C(32, 32, 4, 2)]},
    # contrastive loss: row and column log-sum-exp, and the chunks of H (same tiles: same list)
    "sim.logits": {(True, False): [C(128, 64, 8, 1), C(64, 32, 8, 2), C(64, 16, 4, 3)],
                   (True, True): [C(32, 16, 4, 1), C(32, 16, 4, 2), C(16, 32, 4, 2)],
                   (False, False): [C(64, 64, 4, 2), C(128, 64, 8, 2), C(64, 128, 8, 2)],
                   (False, True): [C(64, 64, 4, 2), C(32, 64, 4, 2)]},
}
del C


def candidates(kernel: str, block_d: int, nc: int, itemsize: int) -> list:
    """The candidate configurations of `kernel` for rows held as nc chunks of block_d columns."""
    return CANDIDATES[kernel][(block_d * nc > 256, itemsize > 2)]


# ----------------------------------------------------------------------------- bank-split plans

class Plan(NamedTuple):
    splits: int      # programs that share one row block's walk over the bank
    per: int         # bank tiles each of them walks


@functools.lru_cache(maxsize=4096)
def split_plan(n_tiles: int, programs: int, sms: int, tile: int, fixed: int, merge: int = 0) -> Plan:
    """Split the n_tiles bank tiles that each of `programs` programs walks into (splits, tiles per
    split): the fewest splits with the shortest modelled makespan, in bytes moved per program,
        waves * (tiles per split * tile + fixed) + (splits - 1) * merge,
    where a wave is one program per SM, `tile` is one bank tile, `fixed` what a program moves besides
    its tiles (its held rows, its partial result) and `merge` what each further split adds to the
    combine that follows. Integer arithmetic, cached per shape: launchers call it on every call.
    Splitting pays only below about one wave of programs."""
    if programs >= sms:
        return Plan(1, n_tiles)
    best = None
    for s in range(1, n_tiles + 1):
        per = -(-n_tiles // s)
        if -(-n_tiles // per) != s:  # same tiles per split as fewer splits: not a new plan
            continue
        span = -(-(programs * s) // sms) * (per * tile + fixed) + (s - 1) * merge
        if best is None or span < best[0]:
            best = (span, Plan(s, per))
    return best[1]


# ----------------------------------------------------------------------------- choosing on the GPU

CHOSEN: dict = {}            # (kernel, device, dtype, shape class) -> the fastest Config
TIMINGS: dict = {}           # same key -> [(Config, median ms)] as measured
RECORD: Callable = None      # kernels.aot sets this to see every candidate's launch (no GPU there)
TIME_ON_CPU = False          # tests set this to run the timing path through the interpreter
ENABLED = os.environ.get("BRGSA_KERNEL_TUNING", "1") != "0"  # 0: always the first candidate


def choose(kernel: str, x: torch.Tensor, shape: tuple, configs: list, launch: Callable) -> Config:
    """The configuration to launch `kernel` with for inputs like x at this shape class. launch(cfg)
    must run the kernel (and whatever it needs) with cfg; it may be called once per candidate here
    before the caller launches the chosen one for real, so it must only write scratch or outputs."""
    if len(configs) == 1:
        return configs[0]
    key = (kernel, str(x.device), x.dtype, shape)
    if key in CHOSEN:
        return CHOSEN[key]
    if RECORD is not None:
        RECORD(kernel, configs, launch)
        return configs[0]
    cuda = x.device.type == "cuda"
    if not ENABLED or not (cuda or TIME_ON_CPU) or (cuda and torch.cuda.is_current_stream_capturing()):
        return configs[0]  # nothing to time here (or a CUDA graph is being captured): the default
    timings = [(cfg, _median_ms(lambda: launch(cfg), cuda)) for cfg in configs]
    fastest = min(timings, key=lambda t: t[1])
    if fastest[1] == float("inf"):  # none runs here: let the default's launch raise its error
        return configs[0]
    TIMINGS[key], CHOSEN[key] = timings, fastest[0]
    return fastest[0]


def _median_ms(fn: Callable, cuda: bool, repeats: int = 5) -> float:
    """Median milliseconds of fn() after one untimed call (which also compiles it); inf when it
    cannot run here (e.g. more shared memory than a smaller GPU than the H100 has)."""
    try:
        fn()
    except Exception:  # noqa: BLE001 - any failure rules this candidate out, nothing more
        return float("inf")
    times = []
    for _ in range(repeats):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def meta(cfg: Config, block_d: int, nc: int, x: torch.Tensor) -> dict:
    """Keyword arguments of a tiled kernel's launch: cfg's tiles, warps and stages, the d-chunking,
    and the interpreter-only constexprs."""
    return dict(BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, BLOCK_D=block_d, NC=nc, **constexprs(x),
                num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def shape_class(n: int) -> int:
    """Rows rounded up to a power of two: one timing serves every batch size in [n/2, n)."""
    return 1 << (max(1, n) - 1).bit_length()
