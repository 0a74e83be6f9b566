"""The plain BrgSA training loop: (volume, report) pairs -> the two encoders -> the BrgSA loss.

    python train.py                                  # synthetic chest-CT set; tiny preset on a CPU
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
import math
import os
import random
import sys
import time
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, fields, replace
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
from torch.nn.parallel import DistributedDataParallel as DDP

import data as data_lib
import eval as eval_lib
from model import PRESETS, BrgSA, flops_per_sample
from prepare import files, pretrained
from prepare.inputs import SUMMARY_BACKENDS, training_inputs


def _f(default, help):
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:  # every field is a flag: --name=value; None means the preset's value
    preset: str = _f("auto", "model and recipe: auto (tiny on a CPU, small on a CUDA GPU), tiny, small or paper")
    data: str = _f("", "data set: a CT-RATE-layout root or a preprocessed dir (default: the synthetic set)")
    synth_dir: str = _f("data_synth", "where the synthetic set is generated when --data is empty")
    synth_n: int = _f(None, "scans in the synthetic set (preset default: tiny 1000, paper 24)")
    summaries: str = _f("rules", "report summaries: rules (offline, findings named by class), "
                                 "rules_report (offline, the report's wording), or a JSONL cache of "
                                 "python -m prepare.summarize (e.g. an LLM's)")
    val_fraction: float = _f(None, "share of the training reports held back to pick best.pt "
                                   "(0 = keep the last step; preset default: tiny 0.1, paper 0)")
    out_dir: str = _f("out", "ckpt.pt, best.pt, eval.json, tokenizer and summaries go here")
    epochs: int = _f(None, "passes over the training reports (preset default: tiny 32, paper 39)")
    max_iters: int = _f(None, "optimizer steps, overriding --epochs")
    batch_size: int = _f(None, "volume-report pairs per step (preset default: tiny 32, paper 64)")
    lr: float = _f(None, "learning rate (preset default: tiny 5e-4, paper 5e-5)")
    weight_decay: float = _f(None, "L2 added to the gradient with --optimizer=adam, decoupled with "
                                   "adamw (preset default: tiny 0.05, paper 1e-6)")
    optimizer: str = _f(None, "adam (L2 decay, the official code's) or adamw (preset default: "
                              "tiny adamw, paper adam)")
    warmup_iters: int = _f(None, "linear LR warm-up steps, then cosine decay to a tenth; 0 = constant LR "
                                 "as in the paper (preset default: tiny 30, paper 0)")
    grad_clip: float = _f(0.25, "clip the global gradient norm to this (0 = off); the paper's 0.25")
    grad_accum: int = _f(1, "micro-batches per step (memory knob; contrastive negatives then span "
                            "one micro-batch only)")
    method: str = _f("brgsa", "brgsa, or an ablation: clip (beta L_INFO only, no bank), no_mse "
                              "(alpha = 0), no_info_r (gamma = 0)")
    text_weights: str = _f("", "Hugging Face BERT folder (e.g. CXR-BERT) for the text encoder; its "
                               "vocab.txt replaces the tokenizer")
    vit_weights: str = _f("", "timm-style ViT weights: a 2-D ViT is inflated, a 3-D one (the "
                              "official M3AE ViT-B) loads as is")
    vit_flip: str = _f("", "axes (letters of xyz) where the --vit_weights' voxel order is reversed "
                           "from ours (RAS); README: starting from the official weights")
    grad_checkpoint: bool = _f(False, "recompute block activations in backward (~1/3 more compute)")
    compile: bool = _f(False, "torch.compile the encoders (slow first steps while it compiles)")
    device: str = _f("auto", "cpu, cuda, cuda:N or auto (cuda when available)")
    dtype: str = _f("auto", "autocast: auto (bf16 on GPUs that have it, else fp16 + GradScaler; "
                            "fp32 on a CPU), bfloat16, float16 or float32")
    workers: int = _f(None, "data-loader processes (default: 0 on a CPU, 4 on a GPU)")
    seed: int = _f(0, "seed of the synthetic set, init, data order, crops and validation split")
    resume: str = _f("off", "on (bare --resume): continue from out_dir/ckpt.pt; auto: resume when "
                            "it exists, else start (for torchrun --max-restarts); off")
    eval_interval: int = _f(None, "validation every N steps (0 = none; default: a tenth of the run)")
    log_interval: int = _f(20, "print a progress line every N steps")
    ckpt_interval: int = _f(200, "write out_dir/ckpt.pt every N steps (and at the end)")


# The recipe of each preset: the flags' defaults above, plus what is not a flag.
TRAIN_PRESETS = {
    "tiny": dict(synth_n=1000, epochs=32, batch_size=32, lr=5e-4, weight_decay=0.05,
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
    bs = global_batch_size(cfg, len(dataset), world, log)
    cfg = replace(cfg, max_iters=cfg.max_iters or max(1, cfg.epochs * (len(dataset) // bs)))
    every = cfg.eval_interval if cfg.eval_interval is not None else max(1, cfg.max_iters // 10)
    dtype = autocast_dtype(cfg.dtype, device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)  # bf16 needs none
    opt = make_optimizer(model.parameters(), cfg, fused=device.type == "cuda")
    keep = Selection(model, cfg, out / "best.pt", inputs, ckpt)
    step = restore(ckpt, opt, scaler, cfg) if ckpt is not None else 0
    log(f"train: {cfg.preset} preset ({cfg.method}), {model.num_params() / 1e6:.1f} M parameters, "
        f"{len(dataset)} training reports, {len({r.report for r in inputs.val})} validation reports, "
        f"{len(inputs.held_out)} held-out volumes, batch {bs} ({world} rank(s) x {cfg.grad_accum} "
        f"micro-batch(es)), {cfg.max_iters} steps on {device} ({str(dtype).split('.')[-1]})"
        + (f", resumed at step {step}" if ckpt is not None else ""), flush=True)

    micro = iter(make_loader(cfg, dataset, bs, step, rank, world, inputs.tokenizer, model.cfg.max_len, device))
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
    """The kept model (best on validation, else the last step) scored once on the held-out split."""
    keep.load_best(step)
    model = keep.model.eval()
    loader = data_lib.eval_loader(inputs.held_out, bs)
    result = eval_lib.zero_shot(model, tokenizer, loader, data_lib.CTRATE_CLASSES, device)
    a = result["arrays"]  # the CT-CLIP protocol on the same volume embeddings
    ctclip = eval_lib.score_volumes(model, tokenizer, a["v"], data_lib.CTRATE_CLASSES,
                                    eval_lib.EvalConfig(protocol="ctclip"), device)
    result.update(step=step, history=history, selected_step=keep.best_step, val_history=keep.history,
                  val_macro_auc=None if keep.best == -math.inf else keep.best,
                  macro_auc_ctclip_protocol=eval_lib.macro_auc(ctclip, a["labels"]),
                  trained_on=inputs.trained_on)
    path = eval_lib.report(result, cfg.out_dir, plots=False)
    chosen = (f"best validation macro AUROC {keep.best:.4f}" if result["val_macro_auc"] is not None
              else "the last")
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


def autocast_dtype(name: str, device) -> torch.dtype:
    """auto: bf16 on GPUs that have it, else fp16 (with a GradScaler); fp32 on the CPU."""
    cuda = device.type == "cuda"
    return {"auto": (torch.bfloat16 if cuda and torch.cuda.is_bf16_supported()
                     else torch.float16 if cuda else torch.float32),
            "bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[name]


def global_batch_size(cfg: TrainConfig, n: int, world: int, log) -> int:
    """--batch_size, lowered to the data set size if needed, as a multiple of world x grad_accum."""
    split = world * cfg.grad_accum
    bs = min(cfg.batch_size, n) // split * split
    if cfg.batch_size % split or bs == 0:
        raise ValueError(f"--batch_size={cfg.batch_size} must be a positive multiple of world size "
                         f"{world} x --grad_accum={cfg.grad_accum} (and at most {n} reports)")
    if bs < cfg.batch_size:
        log(f"train: only {n} training reports, batch size lowered to {bs}")
    return bs


# Dense bf16 tensor-core peak FLOP/s of one GPU by name substring (vendor data sheets; first match
# wins, so "H100 PCIe" precedes "H100"). MFU is always quoted against this bf16 peak.
PEAK_FLOPS = {"H200": 989e12, "H100 PCIe": 756e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12}


def speed(volumes: int, seconds: float, flops_per_volume: float, device, world: int) -> str:
    """Volumes/s; MFU against the GPU's bf16 peak (n/a on a CPU or an unlisted GPU); peak memory."""
    vps = volumes / max(seconds, 1e-9)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    peak = next((v for k, v in PEAK_FLOPS.items() if k in name), 0.0)
    mfu = f"{100 * vps * flops_per_volume / (peak * world):.1f}%" if peak else "n/a"
    gib = f" | peak {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB" if name else ""
    return f"{vps:.1f} vol/s | MFU {mfu}{gib}"  # memory: this rank's GPU


# ----------------------------------------------------------------------------- batches

class StepSeeded(torch.utils.data.Dataset):
    """Makes every training item a pure function of (seed, step, index).

    data.VolumeTextDataset draws an item's crop, summary sentences and reconstruction from a salt
    taken from torch's global RNG; in a DataLoader worker that state depends on the worker's seed and
    on how many items it served before. Reseeding torch's RNG from (seed, step, index) just before
    delegating pins the salt whichever process runs the item, so a resumed run, another worker
    count or another rank split sees the same items; fork_rng restores the caller's RNG afterwards.
    """

    def __init__(self, base, seed: int):
        self.base, self.seed = base, seed

    def __len__(self):
        return len(self.base)

    def __getitem__(self, key):
        step, i = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(((self.seed * 1_000_003 + step) * 1_000_003 + i) % 2**63)
            return self.base[i]


def rank_batches(n, batch_size, seed, start_step, rank=0, world=1, accum=1):
    """This rank's micro-batches of (step, index) pairs, from start_step on. Each epoch is a fresh
    seeded permutation, so a resumed run sees exactly the batches the uninterrupted one would; each
    step's batch is cut into accum * world chunks and rank r's micro-batch m is chunk m * world + r,
    so micro-batch m gathered over the ranks is the slice one process would use."""
    per_epoch, b, step = n // batch_size, batch_size // (world * accum), start_step
    while True:
        epoch, k = divmod(step, per_epoch)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch))
        idx = perm[k * batch_size:(k + 1) * batch_size].tolist()
        for m in range(accum):
            c = m * world + rank
            yield [(step, i) for i in idx[c * b:(c + 1) * b]]
        step += 1


def collate(items, tokenizer, max_len: int):
    volume = torch.stack([it["volume"] for it in items])  # (B, 1, X, Y, Z)
    ids, mask = data_lib.tokenize(tokenizer, [it["text"] for it in items], max_len)
    width = int(mask.sum(1).max())  # padding past the longest text changes nothing: trim it
    return volume, ids[:, :width], mask[:, :width]


def make_loader(cfg, dataset, bs, step, rank, world, tokenizer_json, max_len, device):
    """The training batches from `step` on. The loader's own generator seeds its workers, so that
    making it draws nothing from torch's global RNG (which dropout uses, and a resume restores)."""
    workers = cfg.workers if cfg.workers is not None else (4 if device.type == "cuda" else 0)
    tokenizer = data_lib.tokenizer_from_string(tokenizer_json)
    return torch.utils.data.DataLoader(
        StepSeeded(dataset, cfg.seed), num_workers=workers, pin_memory=device.type == "cuda",
        batch_sampler=rank_batches(len(dataset), bs, cfg.seed, step, rank, world, cfg.grad_accum),
        collate_fn=partial(collate, tokenizer=tokenizer, max_len=max_len),
        generator=torch.Generator().manual_seed(cfg.seed), persistent_workers=workers > 0)


# ----------------------------------------------------------------------------- the kept model and checkpoints

class Selection:
    """The best weights on the validation split, kept in out_dir/best.pt (the last step's when
    there is no validation split), and the record of validation scores."""

    def __init__(self, model, cfg: TrainConfig, path: Path, inputs, ckpt=None):
        self.model, self.cfg, self.path, self.inputs = model, cfg, path, inputs
        self.best, self.best_step, self.history = -math.inf, None, []
        if ckpt is not None:  # resuming: the validation record comes back too
            self.best, self.best_step = ckpt.get("best_val", self.best), ckpt.get("best_step")
            self.history = [tuple(x) for x in ckpt.get("val_history", [])]

    def offer(self, score: float, step: int) -> bool:
        """Keep the weights in best.pt when score beats the best so far (NaN never does)."""
        self.history.append((step, score))
        if not score > self.best:
            return False
        self.best, self.best_step = score, step
        self.save(step, score)
        return True

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
    files.save_torch(dict(model=model.state_dict(), optimizer=opt.state_dict(), step=step,
                          scaler=scaler.state_dict() if scaler.is_enabled() else {}, rng=rng_state(),
                          model_config=asdict(model.cfg), train_config=asdict(cfg),
                          tokenizer=inputs.tokenizer, trained_on=inputs.trained_on,
                          best_val=keep.best, best_step=keep.best_step, val_history=keep.history),
                     path)


def rng_state() -> dict:
    return dict(torch=torch.get_rng_state(), python=list(random.getstate()[1]),
                cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [])


def restore(ckpt: dict, opt, scaler, cfg: TrainConfig) -> int:
    """Optimizer, scaler and RNG states from a checkpoint -> its step. The data order needs nothing
    more: it is a function of (seed, step) (rank_batches, StepSeeded)."""
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
# torchrun sets RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT for every process; without
# them train.py is one plain process and every helper here is a no-op. NCCL on GPUs, gloo on CPU.

# PyTorch 2.13 marks torch.distributed.nn.functional.all_gather deprecated in favour of a private
# API; the public one still works (gloo and NCCL, with gradient): keep it, without a warning per step.
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


def pick_device(name: str) -> torch.device:
    """--device (auto, cpu, cuda, cuda:N; auto:N under torchrun) -> torch.device, or a clear error."""
    if name.startswith("auto"):
        name = ("cuda" + name[4:]) if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(name)
    except RuntimeError:
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise ValueError(f"--device: expected auto, cpu, cuda or cuda:N, got {name!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA GPU is available here (use cpu or auto)")
    if dev.type == "cuda" and (dev.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: only {torch.cuda.device_count()} GPU(s) here")
    return dev


def any_rank(signum) -> bool:
    """Whether any rank was asked to stop (so that all ranks leave the loop at the same step)."""
    if not dist.is_initialized():
        return bool(signum)
    flag = torch.tensor([1.0 if signum else 0.0], device="cuda" if dist.get_backend() == "nccl" else "cpu")
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
    if not is_master():
        barrier()
    yield
    if is_master():
        barrier()


def gather(x: torch.Tensor) -> torch.Tensor:
    """(b, d) on each rank -> (world * b, d) in rank order, differentiable (as open_clip does).

    Why the gradient is exact: every rank computes the same global loss L on the gathered batch;
    all_gather's backward sums every rank's gradient for this rank's slice (world * dL/dx), and DDP
    averages parameter gradients over the ranks, dividing the world factor out again. The bank D,
    used only in the loss, gets dL/dD on every rank, which the average leaves unchanged.
    """
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


def parse_args(argv=None) -> TrainConfig:
    """Flags -> TrainConfig with the preset's values filled in ('auto' resolved) and every value
    checked before minutes of data preparation; a new run never overwrites a checkpoint."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in fields(TrainConfig):
        text = f.metadata["help"] + ("" if "default" in f.metadata["help"] else f" (default: {f.default!r})")
        if f.type is bool:
            p.add_argument(f"--{f.name}", nargs="?", const=True, default=f.default, help=text,
                           type=lambda s: s.lower() in ("1", "true", "yes", "on"))
        elif f.name == "resume":
            p.add_argument("--resume", nargs="?", const="on", default="off", help=text)
        else:
            kind = {"int": int, "float": float, "str": str}[f.type if isinstance(f.type, str) else f.type.__name__]
            p.add_argument(f"--{f.name}", type=kind, default=f.default, help=text)
    cfg = TrainConfig(**vars(p.parse_args(argv)))
    try:
        if cfg.preset not in CHOICES["preset"]:
            raise ValueError(f"--preset must be one of {list(CHOICES['preset'])}, got {cfg.preset!r}")
        if cfg.preset == "auto":  # tiny on a CPU, small on a CUDA GPU
            gpu = pick_device(cfg.device).type == "cuda"
            cfg.preset = "small" if gpu else "tiny"
            if int(os.environ.get("RANK", 0)) == 0:
                print(f"train: --preset auto picked {cfg.preset}: "
                      + ("a CUDA GPU is used" if gpu else "no CUDA GPU is used (sized for 2 CPU cores)")
                      + "; --preset tiny|small|paper chooses one")
        for k, v in TRAIN_PRESETS[cfg.preset].items():
            if hasattr(cfg, k) and getattr(cfg, k) is None:
                setattr(cfg, k, v)
        for name, allowed in CHOICES.items():
            if getattr(cfg, name) not in allowed:
                raise ValueError(f"--{name} must be one of {list(allowed)}, got {getattr(cfg, name)!r}")
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
    lock = files.run_lock(cfg.out_dir, "train.py") if rank == 0 else nullcontext()
    try:
        with lock, files.sigterm_as_interrupt():
            result = train(cfg, rank, world, device)
    except BaseException:
        if dist.is_initialized():  # torchrun stops the other ranks; no barrier they cannot reach
            dist.destroy_process_group()
        raise
    if dist.is_initialized():
        barrier()
        dist.destroy_process_group()
    return result


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
