"""The plain BrgSA training loop: (volume, report) pairs -> the two encoders -> the BrgSA loss.

    python train.py                                  # synthetic chest-CT set; tiny on a CPU, small on a GPU
    python train.py --preset=small --device=cpu      # the one-GPU default on a CPU (~1 h on 2 cores)
    python train.py --preset=paper --data=DIR        # the paper's model on CT-RATE (GPU)
    python train.py --out_dir=out --resume           # continue from out/ckpt.pt
    python train.py --help                           # every flag, with its meaning

Each step embeds a batch of volumes (v) and report summaries (t), re-expresses both through the
knowledge bank and takes L = alpha L_MSE + beta L_INFO + gamma L_INFO-R (cmki.brgsa_loss). With no
--data, a synthetic set in CT-RATE layout is generated first; the inputs (data set, splits,
summaries, tokenizer) come from one call into prepare/inputs.py. A share of the training reports is
held back as a validation split: the weights that score best on it (zero-shot macro AUROC,
eval.validation_auc) are kept in out_dir/best.pt, and the run ends with their per-class zero-shot
table on the held-out scans (out_dir/eval.json). out_dir/ckpt.pt holds the last step's training
state for --resume; Ctrl-C or SIGTERM saves it first. Under torchrun every rank trains on its share of
each batch and embeddings are all-gathered with gradient, so the contrastive negatives span the
global batch (the DDP section below).
"""
import argparse
import inspect
import math
import os
import random
import re
import sys
import time
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
from torch.nn.parallel import DistributedDataParallel as DDP

import data as data_lib
import eval as eval_lib
from analysis.speed import flops_per_sample, speed
from model import PRESETS, BrgSA, pick_device
from prepare import files, pretrained
from prepare.inputs import SUMMARY_BACKENDS, training_inputs


@dataclass
class TrainConfig:  # every field is a flag, --name=value; None: the preset's value (TRAIN_PRESETS)
    preset: str = "auto"      # model and recipe: auto (tiny on a CPU, small on a CUDA GPU), tiny, small, paper
    data: str = ""            # a CT-RATE-layout root or a preprocessed dir; empty: the synthetic set
    synth_dir: str = "data_synth"  # where the synthetic set is generated (--data empty)
    synth_n: int = None       # scans in the synthetic set
    summaries: str = "rules"  # rules, rules_report (offline) or a JSONL cache of prepare.summarize
    val_fraction: float = None  # training reports held back to pick best.pt (0: keep the last step)
    out_dir: str = "out"      # ckpt.pt, best.pt, eval.json, tokenizer and summaries go here
    epochs: int = None        # passes over the training reports
    max_iters: int = None     # optimizer steps, overriding --epochs
    batch_size: int = None    # volume-report pairs per step, over all ranks
    lr: float = None          # peak learning rate
    weight_decay: float = None  # L2 in the gradient (adam) or decoupled (adamw)
    optimizer: str = None     # adam (the official code's, L2 decay) or adamw
    warmup_iters: int = None  # linear warm-up, then cosine decay to a tenth; 0: constant LR (paper)
    grad_clip: float = 0.25   # clip the global gradient norm (0: off); the paper's 0.25
    grad_accum: int = 1       # micro-batches per step (memory; negatives then span one micro-batch)
    method: str = "brgsa"     # or an ablation: clip (L_INFO only, no bank), no_mse, no_info_r
    text_weights: str = ""    # a Hugging Face BERT folder (e.g. CXR-BERT); its vocab.txt is the tokenizer
    vit_weights: str = ""     # timm-style ViT weights: 2-D ones are inflated, 3-D (M3AE ViT-B) load as is
    vit_flip: str = ""        # axes (of xyz) the --vit_weights' voxel order reverses from RAS (README)
    grad_checkpoint: bool = False  # recompute block activations in backward (~1/3 more compute)
    compile: bool = False     # torch.compile the encoders
    device: str = "auto"      # cpu, cuda, cuda:N or auto (cuda when there is one)
    dtype: str = "auto"       # autocast: auto (bf16/fp16 on a GPU, fp32 on a CPU), bfloat16, float16, float32
    workers: int = None       # data-loader processes (None: 0 on a CPU, 4 on a GPU)
    seed: int = 0             # of the synthetic set, init, data order, crops, validation split
    resume: str = "off"       # on (a bare --resume): continue out_dir/ckpt.pt; auto: if it exists
    eval_interval: int = None  # validation every N steps (0: none; None: a tenth of the run)
    log_interval: int = 20    # a progress line every N steps
    ckpt_interval: int = 200  # write out_dir/ckpt.pt every N steps (and at the end)


# Each preset's recipe: the values of the flags left at None, and what is not a flag.
TRAIN_PRESETS = {
    "tiny": dict(synth_n=1000, epochs=32, batch_size=32, lr=5e-4, weight_decay=0.05,
                 optimizer="adamw", warmup_iters=30, val_fraction=0.1,
                 betas=(0.9, 0.98), text_sampling="random", vocab_size=4096),
    # small: the tiny recipe at the small preset's size, for 48 epochs
    "small": dict(synth_n=1000, epochs=48, batch_size=32, lr=5e-4, weight_decay=0.05,
                  optimizer="adamw", warmup_iters=30, val_fraction=0.1,
                  betas=(0.9, 0.98), text_sampling="random", vocab_size=4096),
    # The official trainer: Adam with L2 decay, betas (0.5, 0.999), constant LR, batch 64, 39 epochs,
    # min(5, n) summary sentences per text.
    "paper": dict(synth_n=24, epochs=39, batch_size=64, lr=5e-5, weight_decay=1e-6,
                  optimizer="adam", warmup_iters=0, val_fraction=0.0,
                  betas=(0.5, 0.999), text_sampling="paper", vocab_size=4096),
}


def train(cfg: TrainConfig, rank: int = 0, world: int = 1, device=torch.device("cpu")) -> dict:
    """The whole run on this rank -> the held-out result (rank 0) or the loss history."""
    master, log = rank == 0, print if rank == 0 else (lambda *a, **k: None)
    recipe = TRAIN_PRESETS[cfg.preset]
    out, ckpt_path = Path(cfg.out_dir), Path(cfg.out_dir) / "ckpt.pt"
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    mcfg = replace(PRESETS[cfg.preset], grad_checkpoint=cfg.grad_checkpoint, method=cfg.method)
    if cfg.text_weights:  # its text sizes, and the paper's prompt
        mcfg = replace(mcfg, **pretrained.bert_text_config(cfg.text_weights))
    resume = cfg.resume == "on" or (cfg.resume == "auto" and ckpt_path.is_file())
    ckpt = files.read_checkpoint(ckpt_path, resume_with=mcfg) if resume else None
    with master_first():  # rank 0 generates / preprocesses / summarises once; the others read it
        inputs = training_inputs(cfg, mcfg, recipe["vocab_size"], ckpt and ckpt["tokenizer"], log)
    tokenizer = data_lib.tokenizer_from_string(inputs.tokenizer)
    model = build_model(cfg, replace(mcfg, vocab_size=tokenizer.get_vocab_size()), ckpt, inputs.train, log)
    model = model.to(device)

    dataset = data_lib.VolumeTextDataset(inputs.train, inputs.summaries, model.cfg.crop_size,
                                         train=True, seed=cfg.seed, sentences=recipe["text_sampling"])
    bs = min(cfg.batch_size, len(dataset)) // (world * cfg.grad_accum) * world * cfg.grad_accum
    if bs < cfg.batch_size:  # each rank holds bs / (world * grad_accum) pairs at a time
        log(f"train: {len(dataset)} training reports: batch size {bs} instead of {cfg.batch_size}")
    cfg = replace(cfg, max_iters=cfg.max_iters or max(1, cfg.epochs * (len(dataset) // bs)))
    every = cfg.eval_interval if cfg.eval_interval is not None else max(1, cfg.max_iters // 10)
    gpu = device.type == "cuda"  # auto: bf16 on a GPU that has it, else fp16 (+ GradScaler); CPU fp32
    dtype = getattr(torch, cfg.dtype) if cfg.dtype != "auto" else torch.float32 if not gpu else \
        torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)  # bf16 needs none
    opt = make_optimizer(model.parameters(), cfg, fused=gpu)
    keep = Selection(model, cfg, out / "best.pt", inputs, ckpt)
    step = restore(ckpt, opt, scaler, cfg) if ckpt is not None else 0
    log(f"train: {cfg.preset} preset ({cfg.method}), {model.num_params() / 1e6:.1f} M parameters, "
        f"{len(dataset)} training reports, {len({r.report for r in inputs.val})} validation reports, "
        f"{len(inputs.held_out)} held-out volumes, batch {bs} ({world} rank(s) x {cfg.grad_accum} "
        f"micro-batch(es)), {cfg.max_iters} steps on {device} ({str(dtype)[6:]})"
        + (f", resumed at step {step}" if ckpt is not None else ""), flush=True)

    workers = cfg.workers if cfg.workers is not None else (4 if gpu else 0)
    micro = iter(data_lib.train_loader(dataset, inputs.tokenizer, model.cfg.max_len, bs, cfg.seed, step,
                                       rank, world, cfg.grad_accum, workers, pin=gpu))
    wrapped, no_sync = wrap(model, cfg, device, world)
    model.train()
    history, flops = [], flops_per_sample(model.cfg)
    t0 = t_log = time.time()
    seen = 0
    with files.stop_requests() as stop:  # Ctrl-C / SIGTERM end the run at a whole step
        while step < cfg.max_iters and not any_rank(stop.signum):
            for group in opt.param_groups:
                group["lr"] = lr_at(step, cfg)
            losses = {}
            for m in range(cfg.grad_accum):  # DDP all-reduces only after the last micro-batch
                volume, ids, mask = (x.to(device, non_blocking=True) for x in next(micro))
                with no_sync() if m < cfg.grad_accum - 1 else nullcontext():
                    with torch.autocast(device.type, dtype, enabled=dtype != torch.float32):
                        v, t = wrapped(volume, ids, mask)  # (b, d) each: this rank's share
                        loss = model.loss(gather(v), gather(t))  # on (world * b, d): every negative
                    scaler.scale(loss["total"] / cfg.grad_accum).backward()
                for k, x in loss.items():
                    losses[k] = losses.get(k, 0) + x.detach() / cfg.grad_accum
            if cfg.grad_clip > 0:
                scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
            step, seen = step + 1, seen + bs
            history.append(losses["total"].item())
            if step % cfg.log_interval == 0 or step == cfg.max_iters:
                log(f"step {step:5d}/{cfg.max_iters} | loss {losses['total'].item():.4f} (info "
                    f"{losses['info'].item():.3f}, info_r {losses['info_r'].item():.3f}, mse "
                    f"{losses['mse'].item():.4f}) | {speed(seen, time.time() - t_log, flops, device, world)}",
                    flush=True)
                t_log, seen = time.time(), 0
            if inputs.val and every and (step % every == 0 or step == cfg.max_iters):
                if master:
                    auc = eval_lib.validation_auc(model, tokenizer, inputs.val, device, bs)
                    model.train()
                    kept = keep.offer(auc, step)
                    log(f"step {step:5d} | validation zero-shot macro AUROC {auc:.4f}"
                        f"{' (best so far: best.pt)' if kept else ''}")
                barrier()
            if master and (step % cfg.ckpt_interval == 0 or step == cfg.max_iters):
                save_checkpoint(ckpt_path, model, opt, scaler, step, cfg, inputs, keep)
    if step < cfg.max_iters:  # stopped by a signal: keep the last whole step
        if master:
            save_checkpoint(ckpt_path, model, opt, scaler, step, cfg, inputs, keep)
        raise files.Stopped(f"stopped at step {step} of {cfg.max_iters}; {ckpt_path} holds it. "
                            f"Continue with: python train.py {' '.join(sys.argv[1:])} --resume",
                            stop.signum)
    if not master:
        return dict(step=step, history=history)
    return finish(cfg, keep, tokenizer, inputs, device, bs, step, history, t0)


def finish(cfg, keep, tokenizer, inputs, device, bs, step, history, t0) -> dict:
    """The kept model (best on validation, else the last step) scored once on the held-out split:
    the paper's protocol in full (eval.json), CT-CLIP's macro AUROC on the same embeddings."""
    keep.load_best(step)
    model, classes = keep.model.eval(), data_lib.CTRATE_CLASSES
    result = eval_lib.zero_shot(model, tokenizer, data_lib.eval_loader(inputs.held_out, bs), classes, device)
    ctclip = eval_lib.score_volumes(model, tokenizer, result["arrays"]["v"], classes,
                                    eval_lib.EvalConfig(protocol="ctclip"), device)
    result.update(step=step, history=history, selected_step=keep.best_step, val_history=keep.history,
                  val_macro_auc=None if keep.best == -math.inf else keep.best, trained_on=inputs.trained_on,
                  macro_auc_ctclip_protocol=eval_lib.macro_auc(ctclip, result["arrays"]["labels"]))
    path = eval_lib.report(result, cfg.out_dir, plots=False)
    chosen = "the last" if result["val_macro_auc"] is None else f"best validation macro AUROC {keep.best:.4f}"
    print(f"held-out zero-shot macro AUROC {result['macro_auc']:.4f} over {len(result['auc'])} "
          f"abnormalities, {result['n_volumes']} volumes, model of step {keep.best_step} ({chosen}; "
          f"{time.time() - t0:.0f} s of training); {path}, {keep.path}")
    print(f"(CT-CLIP protocol, 'X is present.' vs 'X is not present.': macro AUROC "
          f"{result['macro_auc_ctclip_protocol']:.4f}; python eval.py --help)")
    return result


# ----------------------------------------------------------------------------- the model and its schedule

def build_model(cfg: TrainConfig, mcfg, ckpt, train_records, log) -> BrgSA:
    """BrgSA: the checkpoint's weights when resuming, else a fresh model (pretrained weights in)."""
    model = BrgSA(mcfg)
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        return model
    if mcfg.input_centering:
        model.visual.set_input_mean(data_lib.mean_volume(train_records))
    if cfg.text_weights:
        log(pretrained.load_bert(model.text, cfg.text_weights).summary())
    if cfg.vit_weights:
        log(pretrained.load_vit(model.visual, cfg.vit_weights, pretrained.parse_flip(cfg.vit_flip)).summary())
    return model


def make_optimizer(params, cfg: TrainConfig, fused: bool) -> torch.optim.Optimizer:
    """Adam with L2 weight decay (the official code's: wd * p joins the gradient before the
    moments) or AdamW (wd * lr * p taken off the weights apart from them)."""
    kind = torch.optim.Adam if cfg.optimizer == "adam" else torch.optim.AdamW
    return kind(params, lr=cfg.lr, betas=TRAIN_PRESETS[cfg.preset]["betas"],
                weight_decay=cfg.weight_decay, fused=fused)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to 10% of --lr; constant (the paper's) without warm-up."""
    if cfg.warmup_iters == 0:
        return cfg.lr
    if step < cfg.warmup_iters:
        return cfg.lr * (step + 1) / cfg.warmup_iters
    progress = (step - cfg.warmup_iters) / max(cfg.max_iters - cfg.warmup_iters, 1)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


# ----------------------------------------------------------------------------- the kept model and checkpoints

class Selection:
    """The weights that score best on the validation split, kept in out_dir/best.pt (the last
    step's when there is none), and the record of validation scores."""

    def __init__(self, model, cfg: TrainConfig, path: Path, inputs, ckpt=None):
        self.model, self.cfg, self.path, self.inputs = model, cfg, path, inputs
        ckpt = ckpt or {}  # resuming: the record comes back too
        self.best, self.best_step = ckpt.get("best_val", -math.inf), ckpt.get("best_step")
        self.history = [tuple(x) for x in ckpt.get("val_history", [])]

    def offer(self, score: float, step: int) -> bool:
        """Keep the weights in best.pt when score beats the best so far (NaN never does)."""
        self.history.append((step, score))
        if score > self.best:
            self.best, self.best_step = score, step
            self.save(step, score)
        return self.best_step == step

    def save(self, step: int, val_auc):
        """best.pt: what eval.py needs (weights, model config, tokenizer) and where it came from."""
        files.save_torch(dict(model=self.model.state_dict(), model_config=asdict(self.model.cfg),
                              train_config=asdict(self.cfg), tokenizer=self.inputs.tokenizer,
                              trained_on=self.inputs.trained_on, step=step, val_macro_auc=val_auc),
                         self.path)

    def load_best(self, last_step: int):
        if self.best_step is None:  # no validation split (or none of its scores was a number)
            self.save(last_step, None)
            self.best_step = last_step
        else:
            self.model.load_state_dict(files.read_checkpoint(self.path)["model"])


def save_checkpoint(path: Path, model, opt, scaler, step, cfg, inputs, keep: Selection):
    """ckpt.pt: everything --resume needs to continue the same run, written atomically at the end
    of a step (the RNG states are where the next step starts)."""
    rng = dict(torch=torch.get_rng_state(), python=list(random.getstate()[1]),
               cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [])
    files.save_torch(dict(model=model.state_dict(), optimizer=opt.state_dict(), step=step, rng=rng,
                          scaler=scaler.state_dict() if scaler.is_enabled() else {},
                          model_config=asdict(model.cfg), train_config=asdict(cfg),
                          tokenizer=inputs.tokenizer, trained_on=inputs.trained_on,
                          best_val=keep.best, best_step=keep.best_step, val_history=keep.history),
                     path)


def restore(ckpt: dict, opt, scaler, cfg: TrainConfig) -> int:
    """Optimizer, scaler and RNG states -> the step; the data order is a function of (seed, step)."""
    opt.load_state_dict(ckpt["optimizer"])
    for group in opt.param_groups:  # the saved groups carry the kind of decay they were made with
        group["decoupled_weight_decay"] = cfg.optimizer == "adamw"
    if ckpt["scaler"]:
        scaler.load_state_dict(ckpt["scaler"])
    torch.set_rng_state(ckpt["rng"]["torch"])
    random.setstate((3, tuple(ckpt["rng"]["python"]), None))
    if ckpt["rng"]["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])
    return ckpt["step"]


# ----------------------------------------------------------------------------- DDP (torchrun)
# torchrun sets RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT; without them train.py is one
# plain process and these helpers do nothing. NCCL on GPUs, gloo on CPUs. torch 2.13 calls the
# public all_gather (with gradient) deprecated; it works: no warning per step.
warnings.filterwarnings("ignore", message=".*all_gather is deprecated", category=FutureWarning)


def ddp_setup(device: str) -> tuple:
    """Join the process group when launched by torchrun -> (rank, world_size, torch.device).
    device is --device: 'auto' means this rank's GPU (LOCAL_RANK) when CUDA is there."""
    if not ("RANK" in os.environ and "WORLD_SIZE" in os.environ):
        return 0, 1, pick_device(device)
    local = int(os.environ.get("LOCAL_RANK", 0))
    dev = pick_device(device if device not in ("auto", "cuda") else f"{device}:{local}")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo",
                                device_id=dev if dev.type == "cuda" else None)
    return dist.get_rank(), dist.get_world_size(), dev


def any_rank(signum) -> bool:
    """Whether any rank was asked to stop, so that all ranks leave the loop at the same step."""
    if not dist.is_initialized():
        return bool(signum)
    flag = torch.tensor([float(bool(signum))], device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def is_master() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def barrier():
    if dist.is_initialized():
        dist.barrier()


@contextmanager
def master_first():
    """Rank 0 runs the block first (it writes the shared caches); the others wait, then read them."""
    barrier() if not is_master() else None
    yield
    barrier() if is_master() else None


def gather(x: torch.Tensor) -> torch.Tensor:
    """(b, d) on each rank -> (world * b, d) in rank order, differentiable (as open_clip does).
    The gradient is exact: every rank computes the same global loss L; all_gather's backward sums
    the ranks' gradients for this rank's slice (world * dL/dx) and DDP's average divides world out
    again. The bank D, used only in the loss, gets dL/dD on every rank, which the average keeps."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return x
    return torch.cat(dist_fn.all_gather(x), dim=0)


def wrap(model, cfg: TrainConfig, device, world: int):
    """-> (the module the step calls, DDP's no_sync or a null context)."""
    ddp = DDP(model, device_ids=[device] if device.type == "cuda" else None) if world > 1 else None
    wrapped = ddp or model
    if cfg.compile:
        wrapped = torch.compile(wrapped)  # after DDP, so the compiled graph keeps DDP's hooks
    return wrapped, ddp.no_sync if ddp else nullcontext


# ----------------------------------------------------------------------------- command line

CHOICES = dict(preset=("auto", *PRESETS), dtype=("auto", "bfloat16", "float16", "float32"),
               optimizer=("adam", "adamw"), method=("brgsa", "clip", "no_mse", "no_info_r"),
               resume=("off", "on", "auto"))


def flag_help() -> dict:
    """{flag: its comment in TrainConfig, with the preset defaults where it has none}: one place
    says what a flag does, for a reader of the code and for --help alike."""
    helps, name = {}, None
    for line in inspect.getsource(TrainConfig).splitlines()[2:]:
        m = re.match(r"\s+(\w+): \w+ = [^#]*#(.*)|\s+#(.*)", line)
        if m:
            name = m.group(1) or name
            helps[name] = (helps.get(name, "") + " " + (m.group(2) or m.group(3)).strip()).strip()
    for f in fields(TrainConfig):
        per = ", ".join(f"{p} {r[f.name]}" for p, r in TRAIN_PRESETS.items() if f.name in r)
        helps[f.name] += f" (preset default: {per})" if f.default is None and per else \
            f" (default: {f.default!r})"
    return helps


def parse_args(argv=None) -> TrainConfig:
    """Flags -> TrainConfig with the preset's values filled in ('auto' resolved) and every value
    checked before minutes of data preparation; a new run never overwrites a checkpoint."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    helps = flag_help()
    for f in fields(TrainConfig):
        text = helps[f.name].replace("%", "%%")
        if f.type is bool:
            p.add_argument(f"--{f.name}", nargs="?", const=True, default=f.default, help=text,
                           type=lambda s: s.lower() in ("1", "true", "yes", "on"))
        elif f.name == "resume":
            p.add_argument("--resume", nargs="?", const="on", default="off", help=text)
        else:
            p.add_argument(f"--{f.name}", type=f.type, default=f.default, help=text)
    cfg = TrainConfig(**vars(p.parse_args(argv)))
    try:
        if cfg.preset == "auto":  # tiny on a CPU, small on a CUDA GPU
            gpu = pick_device(cfg.device).type == "cuda"
            cfg.preset = "small" if gpu else "tiny"
            if int(os.environ.get("RANK", 0)) == 0:
                print(f"train: --preset auto picked {cfg.preset}: " + ("a CUDA GPU is used" if gpu else
                      "no CUDA GPU is used (sized for 2 CPU cores)") + "; --preset tiny|small|paper chooses")
        for name, allowed in CHOICES.items():
            if getattr(cfg, name) not in allowed:
                raise ValueError(f"--{name} must be one of {list(allowed)}, got {getattr(cfg, name)!r}")
            if name == "preset":  # the flags left at None take the preset's values
                for f in fields(cfg):
                    if getattr(cfg, f.name) is None and f.name in TRAIN_PRESETS[cfg.preset]:
                        setattr(cfg, f.name, TRAIN_PRESETS[cfg.preset][f.name])
        check_config(cfg)
    except ValueError as e:
        p.error(str(e))
    return cfg


def check_config(cfg: TrainConfig):
    at_least = dict(synth_n=1, epochs=1, max_iters=1, batch_size=1, grad_accum=1, log_interval=1,
                    ckpt_interval=1, eval_interval=0, warmup_iters=0, workers=0, grad_clip=0,
                    weight_decay=0)
    for name, low in at_least.items():
        if getattr(cfg, name) is not None and getattr(cfg, name) < low:
            raise ValueError(f"--{name} must be >= {low}, got {getattr(cfg, name)}")
    if not cfg.lr > 0:
        raise ValueError(f"--lr must be > 0, got {cfg.lr}")
    if not 0 <= cfg.val_fraction < 1:
        raise ValueError(f"--val_fraction must be in [0, 1), got {cfg.val_fraction}")
    if cfg.summaries not in SUMMARY_BACKENDS and not Path(cfg.summaries).is_file():
        raise ValueError(f"--summaries {cfg.summaries}: neither {' nor '.join(SUMMARY_BACKENDS)} nor "
                         f"a summary cache file (python -m prepare.summarize ... --out FILE)")
    if set(cfg.vit_flip) - set("xyz"):
        raise ValueError(f"--vit_flip takes letters from 'xyz', got {cfg.vit_flip!r}")
    pick_device(cfg.device)
    split = int(os.environ.get("WORLD_SIZE", 1)) * cfg.grad_accum
    if cfg.batch_size % split:
        raise ValueError(f"--batch_size={cfg.batch_size} must be a multiple of world size "
                         f"{split // cfg.grad_accum} x --grad_accum={cfg.grad_accum}")
    ckpt = Path(cfg.out_dir) / "ckpt.pt"
    if ckpt.is_file() and cfg.resume == "off":
        raise ValueError(f"--out_dir {cfg.out_dir} already holds a checkpoint ({ckpt}); a new run "
                         f"would overwrite it. Continue it with --resume, or pick another --out_dir "
                         f"(or move the old one away)")


def main(argv=None):
    cfg = parse_args(argv)
    rank, world, device = ddp_setup(cfg.device)
    try:  # one run per out_dir (rank 0 holds the lock); SIGTERM stops as Ctrl-C does
        with files.run_lock(Path(cfg.out_dir) / ".lock", "train.py") if rank == 0 else nullcontext(), \
                files.sigterm_as_interrupt():
            return train(cfg, rank, world, device)
    finally:
        if dist.is_initialized():  # after an error torchrun stops the other ranks: no barrier
            dist.destroy_process_group()


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"train.py: error: {e}")
    except files.Stopped as e:  # Ctrl-C or SIGTERM during training: ckpt.pt holds the last step
        print(f"train.py: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:  # before training: caches hold whole records, a rerun resumes them
        sys.exit("train.py: interrupted while preparing the inputs; a rerun resumes where it stopped")
