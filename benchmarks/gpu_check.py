"""The GPU check: one call on a lent GPU (at most ~9 minutes) that cannot lose its evidence.

    bash benchmarks/gpu_check.sh              # on the GPU machine; evidence in $OUT (default out/gpu_check)
    bash benchmarks/gpu_check.sh --dry-run    # the same script on a CPU at small sizes, in under 4 minutes

Steps, in order of value; each runs in its own process with its own time limit, inside one deadline
(--deadline, 520 s) that ends the whole check whatever happens (and, beside them from the start,
python -m kernels.aot compiles every variant on spare cores: its report, and a warm Triton cache;
and the train step's inputs, its synthetic set and cache, are made on the CPU ahead of it):
  preflight     torch / triton against the pins (requirements.txt) and the supported range, a CUDA
                device, the imports train.py needs (a missing pure-Python one is unpacked from a
                wheel in --wheels, offline), free space in /tmp and /dev/shm (too little shared memory:
                the data loader runs without workers); fails fast with a one-line reason
  kernels       the ops' self-checks (python -m kernels.bank_attention / .similarity) at their shapes,
                the default run's (bf16 training batches, fp32 scoring) and odd ones; a sharply peaked
                softmax; the fused cmki.brgsa_loss against eager under autocast; fused fp32 scoring
  bench         python -m kernels.bench, each row written as it is measured: eager, SDPA and Triton at
                every size, then every implementation as CUDA graphs at N = 64, then torch.compile
  train         `python train.py` with no model flags (on a GPU: the small preset), end to end on CUDA:
                wall time, held-out AUROC (its inputs waited for first, at most half its time)
  paper_speed   the paper preset on GPU-resident random inputs: volumes/s, MFU, peak memory
  kernel_tests  the kernel test files on CUDA tensors with the real compiler (TRITON_INTERPRET=0)
  paper_train   with the time left, `python train.py --preset=paper` end to end on a few synthetic scans
Work data (synthetic sets, checkpoints) lives in --work under /tmp and is deleted by gpu_check.sh;
--out receives at most 8 small files, each rewritten or appended as its step goes, so a call cut
short keeps what was measured: summary.md and gpu_check.json (every step's status, time and numbers),
kernel_bench.md and kernel_bench.csv (the bench's rows), kernels.log (preflight, self-checks, the
bench's output), train.log, paper.log, kernel_tests.log (each log the last 256 KB of its steps).
--dry-run runs every step on the CPU with small sizes
(kernels through Triton's interpreter; paper_train is skipped): the way this script is tested.
"""
import argparse
import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the tasks below import the project (model, cmki, kernels)
SUPPORTED = dict(torch=(2, 11), triton=((3, 6), (3, 9)))  # what the kernels and the model are kept working on
LOG_TAIL = 256 * 1024  # bytes of a step's output kept in --out
BUDGET = dict(preflight=30, kernels=80, bench=120, train=190, paper_speed=60, kernel_tests=60, paper_train=600)
DRY_BUDGET = dict(preflight=30, kernels=70, bench=40, train=60, paper_speed=30, kernel_tests=40, paper_train=0)


class Check:
    """The state of one run: where things go, the deadline, and the results written after every step."""

    def __init__(self, args):
        self.args, self.out, self.work = args, Path(args.out), Path(args.work)
        self.deadline = time.time() + args.deadline
        self.results, self.env = {}, dict(os.environ, PYTHONUNBUFFERED="1")
        self.workers, self.small_disk, self.has_pytest = None, False, True  # set by preflight
        self.aot = self.ahead = None  # the background compile; train's inputs made ahead
        self.env["TRITON_INTERPRET"] = "1" if args.dry_run else "0"
        self.out.mkdir(parents=True, exist_ok=True)
        self.work.mkdir(parents=True, exist_ok=True)

    def left(self) -> float:
        return self.deadline - time.time()

    def record(self, step: str, **result):
        self.results[step] = result
        _write_atomic(self.out / "gpu_check.json", json.dumps(self.results, indent=1, default=str) + "\n")
        lines = [f"# GPU check{' (dry run, CPU)' if self.args.dry_run else ''}", "",
                 "| step | status | seconds | result |", "|---|---|---:|---|"]
        for name, r in self.results.items():
            shown = {k: v for k, v in r.items() if k not in ("status", "seconds")}
            lines.append(f"| {name} | {r['status']} | {r.get('seconds', 0):.0f} | "
                         + "; ".join(f"{k}: {v}" for k, v in shown.items()).replace("|", "/") + " |")
        _write_atomic(self.out / "summary.md", "\n".join(lines) + "\n")
        print(f"== {step}: {result['status']} ({result.get('seconds', 0):.0f} s) "
              + "; ".join(f"{k}: {v}" for k, v in result.items() if k not in ("status", "seconds")), flush=True)

    def run(self, cmd, limit: float, log: str, env=None) -> tuple[int, str, float]:
        """Run cmd (in ROOT) for at most `limit` seconds (and never past the deadline) -> (exit status,
        output, seconds); 124 when it was stopped. The output's tail is appended to --out/log."""
        limit = max(1.0, min(limit, self.left() - 5))
        t0 = time.time()
        full = self.work / f"{log}.full"
        with open(full, "ab") as f:
            f.write(f"\n$ {' '.join(map(str, cmd))}\n".encode())
            f.flush()
            proc = subprocess.Popen(list(map(str, cmd)), cwd=ROOT, env=env or self.env, stdout=f,
                                    stderr=subprocess.STDOUT, start_new_session=True)
            try:
                rc = proc.wait(timeout=limit)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGTERM)  # the whole process group: data-loader workers too
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                rc = 124
                f.write(f"\n[stopped after {limit:.0f} s]\n".encode())
        data = full.read_bytes()
        start = data.rfind(b"\n$ ")
        text = data[start if start >= 0 else 0:].decode(errors="replace")
        with open(self.out / log, "a") as f:
            f.write(text[-LOG_TAIL // 4:] if len(text) > LOG_TAIL // 4 else text)
        _trim(self.out / log)
        return rc, text, time.time() - t0


def _write_atomic(path: Path, text: str):
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _trim(path: Path):
    """Keep the last LOG_TAIL bytes of a log in --out."""
    if path.stat().st_size > LOG_TAIL:
        _write_atomic(path, path.read_bytes()[-LOG_TAIL:].decode(errors="replace"))


def _version(text: str) -> tuple:
    return tuple(int(v) for v in re.findall(r"\d+", text.split("+")[0])[:2])


# ----------------------------------------------------------------------------- steps

PREFLIGHT = r"""
import importlib, json, os, shutil, sys
info = dict(python=sys.version.split()[0])
for m in ("torch", "triton", "numpy", "tokenizers", "nibabel", "pytest"):  # pytest: kernel_tests only
    try:
        info[m] = getattr(importlib.import_module(m), "__version__", "?")
    except ImportError as e:  # the module, or one it imports
        info[m] = None
        info.setdefault("missing", {})[m] = getattr(e, "name", None) or m
import torch
info["cuda"] = torch.cuda.is_available()
if info["cuda"]:
    p = torch.cuda.get_device_properties(0)
    info.update(gpu=p.name, gpu_gib=round(p.total_memory / 2**30, 1), sm=f"{p.major}.{p.minor}",
                sms=p.multi_processor_count, cuda_version=torch.version.cuda,
                bf16=torch.cuda.is_bf16_supported())
print("PREFLIGHT " + json.dumps(info))
"""


def _unpack_wheel(check: Check, module: str) -> bool:
    """Unpack a wheel of `module` from --wheels into the work site folder (pure-Python ones)."""
    wheels = sorted(Path(check.args.wheels).glob(f"{module.replace('-', '_')}-*.whl"))
    if not wheels:
        return False
    site = check.work / "site"
    with zipfile.ZipFile(wheels[-1]) as z:
        z.extractall(site)
    paths = check.env.get("PYTHONPATH", "").split(os.pathsep)
    if str(site) not in paths:
        check.env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), *paths]))
    return True


def preflight(check: Check) -> bool:
    t0 = time.time()
    notes, info = [], {}
    for _ in range(6):  # missing modules, then perhaps what they import in turn, from the wheels
        rc, text, _ = check.run([sys.executable, "-c", PREFLIGHT], 60, "kernels.log")
        line = next((s for s in text.splitlines() if s.startswith("PREFLIGHT ")), None)
        if line is None:
            return _fail(check, "preflight", t0, "python -c 'import torch' failed: " + text.strip()[-200:])
        info = json.loads(line[len("PREFLIGHT "):])
        unpacked = [m for m in set(info.get("missing", {}).values()) if m not in ("torch", "triton")
                    and _unpack_wheel(check, m)]
        if not unpacked:
            break
        notes.append(f"{', '.join(unpacked)} from {check.args.wheels}")
    missing = info.get("missing", {})
    check.has_pytest = "pytest" not in missing
    if not check.has_pytest:
        notes.append(f"pytest cannot import {missing.pop('pytest')}: kernel_tests is skipped")
    if missing:
        top, needed = next(iter(missing.items()))
        return _fail(check, "preflight", t0, f"cannot import {top} ({needed} is missing, and no wheel of it in "
                                             f"{check.args.wheels}/: pip download {needed} --no-deps -d "
                                             f"{check.args.wheels})")
    pins = dict(re.findall(r"^(torch|triton)==(\S+)", (ROOT / "requirements.txt").read_text(), re.M))
    lo, (tlo, thi) = SUPPORTED["torch"], SUPPORTED["triton"]
    if _version(info["torch"]) < lo:
        return _fail(check, "preflight", t0,
                     f"torch {info['torch']} is older than {lo[0]}.{lo[1]} (pinned {pins.get('torch')})")
    if not tlo <= _version(info["triton"]) <= thi:
        return _fail(check, "preflight", t0, f"triton {info['triton']} is outside {tlo[0]}.{tlo[1]}-{thi[0]}.{thi[1]}")
    if not check.args.dry_run and not info.get("cuda"):
        return _fail(check, "preflight", t0, "torch sees no CUDA device")
    if check.args.dry_run and _version(info["triton"]) < (3, 7) and _version(info["numpy"]) >= (2, 4):
        return _fail(check, "preflight", t0, f"Triton {info['triton']}'s interpreter fails with numpy {info['numpy']} "
                                             "(int() of a 1-element array): pip install 'numpy<2.4'")
    tmp_gb = shutil.disk_usage(check.work).free / 1e9
    if tmp_gb < 3:
        return _fail(check, "preflight", t0, f"only {tmp_gb:.1f} GB free in {check.work}")
    shm = shutil.disk_usage("/dev/shm").free / 2 ** 30 if os.path.isdir("/dev/shm") else 0.0
    check.workers = None if shm >= 2 or check.args.dry_run else 0
    if check.workers == 0:
        notes.append(f"/dev/shm has {shm:.2f} GiB free: train.py runs with --workers=0")
    check.small_disk = tmp_gb < 10
    for what in ("torch", "triton"):
        if pins.get(what) and info[what].split("+")[0] != pins[what]:
            notes.append(f"{what} {info[what]} (pinned {pins[what]}; supported)")
    check.record("preflight", status="ok", seconds=time.time() - t0, python=info["python"], torch=info["torch"],
                 triton=info["triton"], gpu=info.get("gpu", "none (dry run)"),
                 **({"gpu_gib": info["gpu_gib"], "sm": info["sm"], "sms": info["sms"]} if info.get("cuda") else {}),
                 tmp_free_gb=round(tmp_gb, 1), shm_free_gib=round(shm, 2), notes="; ".join(notes) or "none")
    return True


def compile_ahead(check: Check):
    """Start python -m kernels.aot in the background: every variant and candidate compiled for sm_90 on
    the machine's own cores (Triton's cache then serves the JIT of the steps that follow, where the
    keys agree) and its spill / shared-memory report under this machine's Triton. Not waited for."""
    cmd = [sys.executable, "-m", "kernels.aot", "--jobs", str(max(1, min(8, (os.cpu_count() or 2) // 2))),
           "--dtypes", "bf16,fp32", "--json", str(check.work / "aot.json")]
    if check.args.dry_run:  # a taste only: 2 cores
        cmd += ["--only", "--shape", "bank_attention:16,64,32", "--dtypes", "bf16", "--jobs", "1"]
    env = {k: v for k, v in check.env.items() if k != "TRITON_INTERPRET"}
    log = open(check.work / "aot.log", "wb")
    check.aot = (subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                  start_new_session=True), time.time())


def compile_report(check: Check):
    """Record the background compile: its targets if it finished, else that it was stopped."""
    proc, t0 = check.aot
    try:
        proc.wait(timeout=max(0.0, min(60.0, check.left() - 5)))
    except subprocess.TimeoutExpired:  # an extra: stopping it fails nothing
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return check.record("compile_ahead", status="stopped", seconds=time.time() - t0, reason="deadline")
    report = check.work / "aot.json"
    if not report.exists():
        tail = (check.work / "aot.log").read_text(errors="replace").strip()[-300:]
        return check.record("compile_ahead", status="FAILED", seconds=time.time() - t0, reason=tail)
    data = json.loads(report.read_text())
    missed = [t["target"] for t in data["targets"] if not t["met"]]
    check.record("compile_ahead", status="ok" if not missed else "FAILED", seconds=time.time() - t0,
                 triton=data["triton"], variants=len(data["kernels"]),
                 targets="all met" if not missed else "NOT MET: " + "; ".join(missed)[:300])


def _train_args(check: Check) -> list:
    """The train step's flags: no model flags (the preset is the one train.py picks here)."""
    args = [f"--synth_dir={check.work / 'synth'}", f"--out_dir={check.work / 'train'}"]
    if check.args.dry_run:
        args += ["--synth_n=40", "--max_iters=3", "--batch_size=8", "--eval_interval=0"]
    return args + (["--workers=0"] if check.workers == 0 else [])


def prepare_ahead(check: Check):
    """Start making the train step's inputs (its synthetic set, the preprocessed cache, the summaries:
    CPU work, minutes for the small preset's 1000 scans) in the background while the GPU steps run."""
    log = open(check.work / "inputs.log", "wb")
    cmd = [sys.executable, __file__, "--task", "train_inputs"] + _train_args(check)
    check.ahead = (subprocess.Popen(cmd, cwd=ROOT, env=check.env, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True), time.time())


def wait_ahead(check: Check, limit: float):
    """Wait (at most `limit` s) for the inputs made ahead; stopped unfinished, they are deleted and
    train.py makes them itself."""
    proc, t0 = check.ahead
    try:
        rc = proc.wait(timeout=max(1.0, limit))
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        shutil.rmtree(check.work / "synth", ignore_errors=True)
        rc = 124
    tail = (check.work / "inputs.log").read_text(errors="replace").strip()[-300:]
    check.record("train_inputs", status={0: "ok", 124: "stopped"}.get(rc, "FAILED"),
                 seconds=time.time() - t0, **({"reason": tail} if rc not in (0, 124) else {}))


def _fail(check, step, t0, reason) -> bool:
    check.record(step, status="FAILED", seconds=time.time() - t0, reason=reason)
    return False


def _default_shapes(dry: bool) -> dict:
    """The default run's kernel shapes: its preset's bank (K, d), training batches of 32 and 64 in
    bf16, and scoring an odd last batch in fp32 against the 18 prompts."""
    if dry:
        return dict(bank=["1,300,200", "33,40,33", "32,256,192"], sim=["67,18,200", "32,18,192"])
    from model import PRESETS  # noqa: E402  (the model's sizes; kernels/ itself never imports it)
    cfg = PRESETS["small"]  # what `python train.py` picks on a GPU
    K, d = cfg.bank_size, cfg.embed_dim
    bank = ["67,300,768", "1,300,200", "8500,40,200", "64,2048,768", f"32,{K},{d}", f"64,{K},{d}", f"37,{K},{d}"]
    sim = ["131,19,768", "67,18,200", "1,1,200", "64,18,768", f"32,18,{d}", f"64,18,{d}", f"37,18,{d}"]
    return dict(bank=bank, sim=sim)


def kernels(check: Check):
    t0, dry = time.time(), check.args.dry_run
    shapes, budget = _default_shapes(dry), (DRY_BUDGET if dry else BUDGET)["kernels"]
    env = dict(check.env, BRGSA_KERNEL_TUNING="0")  # the default configurations; the bench times the others
    results = {}
    for name, module, key in (("bank_attention", "kernels.bank_attention", "bank"),
                              ("similarity", "kernels.similarity", "sim")):
        cmd = [sys.executable, "-m", module] + [a for s in shapes[key] for a in ("--shape", s)]
        rc, text, _ = check.run(cmd, budget * 0.4, "kernels.log", env=env)
        failed = f"FAILED ({text.count('FAILED') - 1} cases)"
        results[name] = "ok" if rc == 0 else ("timed out" if rc == 124 else failed)
    rc, text, _ = check.run([sys.executable, __file__, "--task", "kernel_extras"] + (["--dry-run"] if dry else []),
                            budget * 0.2, "kernels.log", env=env)
    results["extras"] = "ok" if rc == 0 else ("timed out" if rc == 124 else "FAILED")
    worst = [line.split("rel err ")[-1] for line in text.splitlines() if line.startswith("extra ")]
    ok = all(v == "ok" for v in results.values())
    check.record("kernels", status="ok" if ok else "FAILED", seconds=time.time() - t0, **results,
                 extras_detail=" | ".join(worst)[:400])


def bench(check: Check):
    t0, dry = time.time(), check.args.dry_run
    budget = min((DRY_BUDGET if dry else BUDGET)["bench"], check.left() - 5)
    stem = check.out / "kernel_bench"
    base = [sys.executable, "-m", "kernels.bench", "--out", stem]
    if dry:
        runs = [(base + ["--size", "bank_attention:16,64,32", "--size", "contrastive_loss:16,0,32",
                         "--impls", "eager,sdpa,triton", "--warmup", "2", "--repeats", "3"], 1.0)]
    else:  # what matters most first: ours against eager at every size; then launch overhead removed; then compile
        small = ["--size", "bank_attention:64,2048,768", "--size", "contrastive_loss:64,0,768"]
        runs = [(base + ["--impls", "eager,sdpa,triton", "--repeats", "20"], 0.5),
                (base + ["--append", "--graphs", "--impls", "eager,compile,triton", "--repeats", "30"] + small, 0.25),
                (base + ["--append", "--impls", "compile", "--repeats", "10"], 0.25)]
    statuses = []
    for cmd, share in runs:
        limit = budget * share
        rc, text, _ = check.run(cmd + ["--deadline", f"{max(1, limit - 20):.0f}"], limit, "kernels.log")
        statuses.append("ok" if rc == 0 else "timed out" if rc == 124 else "FAILED")
    table = stem.with_suffix(".csv")
    rows = list(csv.DictReader(table.open())) if table.exists() else []
    failed = sum(r["status"].startswith("FAILED") for r in rows)
    speed = [f"{r['op']} N={r['N']} {r['mode']} {float(r['speed']):.2f}x" for r in rows
             if r["impl"].startswith("triton") and r["speed"]]
    check.record("bench", status="ok" if statuses == ["ok"] * len(runs) and not failed else "FAILED",
                 seconds=time.time() - t0, runs=" / ".join(statuses), rows=len(rows), failed_rows=failed,
                 triton_vs_eager=", ".join(speed)[:500] or "none measured")


def train(check: Check):
    dry = check.args.dry_run
    budget = (DRY_BUDGET if dry else BUDGET)["train"]
    if check.ahead is not None:  # the inputs first: at most half the step's time
        t0 = time.time()
        wait_ahead(check, min(budget / 2, check.left() - 30))
        budget -= time.time() - t0
    cmd = [sys.executable, "train.py"] + _train_args(check)
    rc, text, secs = check.run(cmd, budget, "train.log")
    auc = re.findall(r"held-out zero-shot macro AUROC ([0-9.]+)", text)
    steps = re.findall(r"^step\s+(\d+)/(\d+).*?\|\s*([0-9.]+) vol/s", text, re.M)
    header = next((s for s in text.splitlines() if s.startswith("train: ") and " preset " in s), "")
    check.record("train", status="ok" if rc == 0 and auc else ("timed out" if rc == 124 else "FAILED"),
                 seconds=secs, wall_s=round(secs), macro_auroc=auc[-1] if auc else "n/a",
                 last_step=f"{steps[-1][0]}/{steps[-1][1]} at {steps[-1][2]} vol/s" if steps else "n/a",
                 run=header[7:160])
    shutil.rmtree(check.work / "train", ignore_errors=True)  # checkpoints are work data, not evidence


def paper_speed(check: Check):
    dry = check.args.dry_run
    limit = (DRY_BUDGET if dry else BUDGET)["paper_speed"]
    rc, text, secs = check.run([sys.executable, __file__, "--task", "paper_speed", "--seconds", str(limit * 0.5)]
                               + (["--dry-run"] if dry else []), limit, "paper.log")
    line = next((s for s in reversed(text.splitlines()) if s.startswith("paper ")), "")
    check.record("paper_speed", status="ok" if rc == 0 and line else ("timed out" if rc == 124 else "FAILED"),
                 seconds=secs, result=line[6:] or text.strip()[-200:])


def kernel_tests(check: Check):
    dry = check.args.dry_run
    if not check.has_pytest:
        return check.record("kernel_tests", status="skipped", seconds=0, reason="no pytest on this machine")
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "tests/test_bank_attention.py",
           "tests/test_similarity.py"] + (["-k", "split_plans or single_entry or bad"] if dry else [])
    rc, text, secs = check.run(cmd, (DRY_BUDGET if dry else BUDGET)["kernel_tests"], "kernel_tests.log")
    summary = next((s for s in reversed(text.splitlines()) if " passed" in s or " failed" in s), text.strip()[-120:])
    check.record("kernel_tests", status="ok" if rc == 0 else ("timed out" if rc == 124 else "FAILED"),
                 seconds=secs, device="cuda" if not dry else "cpu (interpreter)", result=summary.strip("= "))


def paper_train(check: Check):
    if check.args.dry_run or check.left() < 60 or check.small_disk:
        why = "dry run" if check.args.dry_run else "too little disk" if check.small_disk else "no time left"
        return check.record("paper_train", status="skipped", seconds=0, reason=why)
    cmd = [sys.executable, "train.py", "--preset=paper", "--synth_n=24", "--max_iters=20", "--log_interval=5",
           "--eval_interval=0", f"--synth_dir={check.work / 'synth_paper'}", f"--out_dir={check.work / 'paper'}"]
    rc, text, secs = check.run(cmd + (["--workers=0"] if check.workers == 0 else []),
                               check.left() - 10, "paper.log")
    auc = re.findall(r"held-out zero-shot macro AUROC ([0-9.]+)", text)
    steps = [s for s in text.splitlines() if s.startswith("step ")]
    check.record("paper_train", status="ok" if rc == 0 else ("timed out" if rc == 124 else "FAILED"), seconds=secs,
                 last_step=steps[-1][:160] if steps else "n/a", macro_auroc=auc[-1] if auc else "n/a")
    shutil.rmtree(check.work / "paper", ignore_errors=True)


# ----------------------------------------------------------------------------- tasks run in their own process

def task_kernel_extras(dry: bool) -> int:
    """A sharply peaked softmax; the fused brgsa_loss against eager under autocast; fp32 scoring."""
    import torch

    from kernels.tiles import interpreter_rounds_bf16
    interpreter_rounds_bf16()
    import cmki
    from kernels.bank_attention import TOL, TOL_TF32, bank_attention, bank_attention_reference
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    ok = True
    torch.manual_seed(0)
    N, K, d = (16, 100, 33) if dry else (64, 2048, 768)
    for dtype in (torch.float32, torch.bfloat16):  # logits up to ~100: P one-hot, dx a cancellation
        x, D, dO = (torch.randn(n, d, device=dev) for n in (N, K, N))
        x = x * 30
        args = [t.to(dtype).requires_grad_() for t in (x, D)]
        out = bank_attention(*args, d ** -0.5)
        got = [out, *torch.autograd.grad(out, args, dO.to(dtype))]
        x64, D64, dO64 = (t.to(dtype).double() for t in (x, D, dO))
        ref = [t.requires_grad_() for t in (x64.clone(), D64.clone())]
        want = bank_attention_reference(*ref, d ** -0.5)
        want = [want, *torch.autograd.grad(want, ref, dO64)]
        P = torch.softmax(d ** -0.5 * x64 @ D64.t(), -1)
        dS = P * (dO64 @ D64.t()).abs()
        size = [P @ D64.abs(), d ** -0.5 * dS @ D64.abs(), P.t() @ dO64.abs() + d ** -0.5 * dS.t() @ x64.abs()]
        errs = [((g.double() - w).abs().max() / s.abs().max()).item() for g, w, s in zip(got, want, size)]
        tol = max(TOL_TF32 if (dtype == torch.float32 and dev == "cuda") else TOL[dtype], 1e-4)
        ok &= all(torch.isfinite(g).all().item() for g in got) and max(errs) <= tol
        print(f"extra peaked softmax {str(dtype)[6:]} N={N} K={K} d={d}: error / term size out/dx/dD = "
              + " / ".join(f"{e:.1e}" for e in errs) + f" (tol {tol:g}) {'ok' if max(errs) <= tol else 'FAILED'}")
    # the whole objective, fused against eager, both under autocast, each against float64 without it
    B, K, d = (8, 64, 32) if dry else (64, 2048, 768)
    v, t, bank = torch.randn(B, d, device=dev), torch.randn(B, d, device=dev), torch.randn(K, d, device=dev)
    results = {}
    for name, use, autocast, dt in (("fused", True, True, None), ("eager", False, True, None),
                                    ("float64", False, False, torch.float64)):
        cmki.USE_KERNELS = use
        leaves = [a.to(dt or a.dtype).clone().requires_grad_() for a in (v, t, bank)]
        with torch.autocast(dev, torch.bfloat16, enabled=autocast):
            losses = cmki.brgsa_loss(*leaves, scale=d ** -0.5)
        results[name] = [losses[k].detach() for k in ("total", "mse", "info", "info_r")] + \
            list(torch.autograd.grad(losses["total"], leaves))
    cmki.USE_KERNELS = True
    names = ("total", "mse", "info", "info_r", "dv", "dt", "dbank")
    err = {k: [((g.double() - w).abs().max() / w.abs().max()).item() for g, w in zip(results[k], results["float64"])]
           for k in ("fused", "eager")}
    good = all(f <= max(2 * e, TOL[torch.bfloat16]) for f, e in zip(err["fused"], err["eager"]))
    ok &= good
    print(f"extra brgsa_loss under bf16 autocast B={B} K={K} d={d}, rel err vs float64 fused (eager) "
          + ", ".join(f"{n} {f:.1e} ({e:.1e})" for n, f, e in zip(names, err["fused"], err["eager"]))
          + f" (fused <= max(2 x eager, {TOL[torch.bfloat16]:g})) {'ok' if good else 'FAILED'}")
    # fp32 scoring: validation and the final evaluation call zero_shot_scores outside autocast
    C = 18
    prompts = torch.randn(C, d, device=dev)
    got = cmki.zero_shot_scores(v, prompts, bank, d ** -0.5)
    cmki.USE_KERNELS = False
    want = cmki.zero_shot_scores(v.double(), prompts.double(), bank.double(), d ** -0.5)
    cmki.USE_KERNELS = True
    e = ((got.double() - want).abs().max() / want.abs().max()).item()
    tol = TOL_TF32 if dev == "cuda" else TOL[torch.float32]
    ok &= e <= tol
    print(f"extra fp32 zero-shot scores N={B} C={C} K={K} d={d}: rel err {e:.1e} (tol {tol:g}) "
          f"{'ok' if e <= tol else 'FAILED'}")
    return 0 if ok else 1


def task_train_inputs(train_args: list) -> int:
    """train.py's inputs for these flags, made ahead: the synthetic set, its cache, the summaries."""
    import train
    from model import PRESETS
    from prepare.inputs import training_inputs
    cfg = train.parse_args(train_args)
    training_inputs(cfg, PRESETS[cfg.preset], train.TRAIN_PRESETS[cfg.preset]["vocab_size"])
    return 0


def task_paper_speed(dry: bool, seconds: float) -> int:
    """Training steps of the paper preset on random inputs already on the device (no data loading):
    volumes/s, MFU against the data-sheet bf16 peak, peak memory; the batch halves until it fits."""
    import dataclasses

    import torch

    from kernels.bench import PEAK_BF16
    from analysis.speed import flops_per_sample
    from model import PRESETS, BrgSA
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = PRESETS["paper"]
    if dry:  # the paper's layout at toy sizes, for the CPU
        cfg = dataclasses.replace(cfg, image_size=(32, 32, 16), crop_size=(32, 32, 16), vit_width=64, vit_depth=1,
                                  vit_heads=2, text_width=64, text_depth=1, text_heads=2, text_mlp=128,
                                  embed_dim=64, bank_size=128, max_len=16, vocab_size=100)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU"
    peak = next((v for k, v in PEAK_BF16.items() if k.lower() in name.lower()), None)
    for B, ckpt in ((2, False), (1, False)) if dry else ((64, False), (64, True), (32, True), (16, True)):
        torch.manual_seed(0)
        model = BrgSA(dataclasses.replace(cfg, grad_checkpoint=ckpt)).to(dev)
        opt = torch.optim.Adam(model.parameters(), lr=5e-5, betas=(0.5, 0.999), fused=dev.type == "cuda")
        vol = torch.randn(B, 1, *cfg.crop_size, device=dev)
        ids = torch.randint(1, cfg.vocab_size, (B, cfg.max_len), device=dev)
        mask = torch.ones_like(ids)

        def step():
            with torch.autocast(dev.type, torch.bfloat16, enabled=dev.type == "cuda"):
                v, t = model.visual(vol), model.text(ids, mask)
                loss = model.loss(v, t)["total"]
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.25)
            opt.step()
            opt.zero_grad(set_to_none=True)
        try:
            for _ in range(1 if dry else 3):  # warm-up: cuDNN / Triton choices, allocator
                step()
            if dev.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            n, t0 = 0, time.time()
            while n < 2 or (time.time() - t0 < seconds and n < 50):
                step()
                n += 1
                if dev.type == "cuda":
                    torch.cuda.synchronize()
            secs = time.time() - t0
        except torch.OutOfMemoryError:
            model = opt = None  # free them before the smaller batch
            torch.cuda.empty_cache()
            print(f"batch {B}{' with grad checkpointing' if ckpt else ''}: out of memory", flush=True)
            continue
        vps = B * n / secs
        mfu = f"{100 * vps * flops_per_sample(cfg) / peak:.1f}%" if peak else "n/a (unknown peak)"
        mem = f", peak {torch.cuda.max_memory_allocated() / 2 ** 30:.1f} GiB" if dev.type == "cuda" else ""
        print(f"paper {'(toy sizes) ' if dry else ''}batch {B}{' + grad checkpointing' if ckpt else ''}: "
              f"{vps:.1f} vol/s, MFU {mfu}{mem}, {n} steps in {secs:.1f} s, {name}", flush=True)
        return 0
    return 1


# ----------------------------------------------------------------------------- main

def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dry-run", action="store_true", help="CPU, small sizes, kernels through the interpreter")
    p.add_argument("--out", default="out/gpu_check", help="the evidence: at most 8 small files")
    p.add_argument("--work", default=None, help="work data (default: a new folder under /tmp, deleted at the end)")
    p.add_argument("--wheels", default=str(ROOT / ".gpu_wheels"), help="wheels of modules the machine lacks")
    p.add_argument("--deadline", type=float, default=520, help="seconds: the whole check ends by then")
    p.add_argument("--task", choices=["kernel_extras", "paper_speed", "train_inputs"], help=argparse.SUPPRESS)
    p.add_argument("--seconds", type=float, default=20, help=argparse.SUPPRESS)
    args, rest = p.parse_known_args(argv)
    if args.task == "train_inputs":  # rest: the train step's flags
        return task_train_inputs(rest)
    if rest:
        p.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.task == "kernel_extras":
        return task_kernel_extras(args.dry_run)
    if args.task == "paper_speed":
        return task_paper_speed(args.dry_run, args.seconds)
    if args.dry_run:
        args.deadline = min(args.deadline, 225)
    own_work = args.work is None
    if own_work:
        import tempfile
        args.work = tempfile.mkdtemp(prefix="gpu_check.", dir="/tmp")
    check = Check(args)
    try:
        if not preflight(check):
            return 1
        compile_ahead(check)
        prepare_ahead(check)
        for step in (kernels, bench, train, paper_speed, kernel_tests, paper_train):
            if check.left() < 15:
                check.record(step.__name__, status="skipped", seconds=0, reason="deadline")
                continue
            step(check)
        compile_report(check)
    finally:
        for job in (check.aot, check.ahead):
            if job is not None and job[0].poll() is None:
                os.killpg(job[0].pid, signal.SIGKILL)
        if own_work:
            shutil.rmtree(check.work, ignore_errors=True)
    failed = [k for k, r in check.results.items() if r["status"] not in ("ok", "skipped", "stopped")]
    print(f"gpu_check: {'all steps ok' if not failed else 'not ok: ' + ', '.join(failed)}; evidence in {check.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
