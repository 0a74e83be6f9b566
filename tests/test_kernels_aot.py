"""kernels.aot on a machine without a GPU: every kernel variant the launchers may run at the
benchmark's shapes and at every preset's (the default run's included) compiles for sm_90 (TTIR ->
TTGIR -> LLIR -> PTX -> cubin, with the ptxas shipped in the Triton wheel), every candidate
configuration among them, and the CPU-side targets hold: 0 spill bytes in every variant, 16-bit
and fp32, shared memory within the H100's 227 KB, executed FLOPs <= 1.25x (bank attention) and
<= 1.4x (contrastive loss) of the algorithmic count, modelled L2 -> SM traffic >= 3x below the
earlier kernels' report.

The interpreter the other tests use never runs Triton's GPU compiler, so layout, shared-memory or
dot-shape errors would only show on a GPU. The report runs in a subprocess without TRITON_INTERPRET
(conftest sets it for this process, and a kernel decorated under the interpreter cannot be compiled).
bf16 and fp32 are compiled here (fp16 takes the bf16 code paths); `python -m kernels.aot` does all
three. A first run compiles for a few minutes on 2 cores; Triton's cache makes reruns quick.
"""
import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import model
from kernels import tuning

ROOT = Path(__file__).resolve().parents[1]
BEFORE = ROOT / "benchmarks" / "kernels_aot_before.json"
FAMILIES = {"bank.fwd": ["bank_attention._fwd_kernel"], "bank.split": ["bank_attention._fwd_split_kernel"],
            "bank.bwd": ["bank_attention._bwd_kernel"],
            "sim.logits": ["similarity._lse_kernel", "similarity._h_kernel"]}


def _preset_shapes() -> list:
    """Every preset's kernel shapes: training batches of 32 and 64, an odd scoring batch, 18 prompts."""
    out = []
    for cfg in model.PRESETS.values():
        K, d = cfg.bank_size, cfg.embed_dim
        out += [f"bank_attention:32,{K},{d}", f"bank_attention:64,{K},{d}", f"bank_attention:37,{K},{d}",
                f"contrastive_loss:32,0,{d}", f"cosine_scores:37,18,{d}"]
    return out


def test_every_variant_and_candidate_compiles_for_sm90_within_the_targets(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    report = tmp_path / "aot.json"
    cmd = [sys.executable, "-m", "kernels.aot", "--dtypes", "bf16,fp32", "--json", str(report), "--before", str(BEFORE)]
    for shape in _preset_shapes():
        cmd += ["--shape", shape]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)
    data = json.loads(report.read_text()) if report.exists() else None
    missed = [t["target"] for t in data["targets"] if not t["met"]] if data else ["no report written"]
    assert proc.returncode == 0 and not missed, \
        "targets not met:\n" + "\n".join(missed) + f"\n{proc.stdout[-4000:]}\n{proc.stderr[-3000:]}"
    kernels = {r["kernel"] for r in data["kernels"]}
    assert {"bank_attention._fwd_kernel", "bank_attention._fwd_split_kernel", "bank_attention._combine_kernel",
            "bank_attention._bwd_kernel", "similarity._lse_kernel", "similarity._h_kernel",
            "similarity._cosine_kernel"} <= kernels, kernels
    assert all(r["regs"] > 0 for r in data["kernels"]), "ptxas reported no registers"
    assert sum("L2" in t["target"] for t in data["targets"]) == 2  # both ops against the earlier report
    assert any("fp32" in t["target"] and "spill" in t["target"] for t in data["targets"])
    # every candidate of every list, for both widths (768: three chunks; 192: one) and both dtypes
    compiled = {(r["kernel"], r["dtype"], r["config"]) for r in data["kernels"]}
    for family, kernels_of in FAMILIES.items():
        for (wide, fp32), configs in tuning.CANDIDATES[family].items():
            for cfg in configs:
                label = (f"BLOCK_M={cfg.BLOCK_M} BLOCK_N={cfg.BLOCK_N} BLOCK_D=256 NC={3 if wide else 1} "
                         f"num_warps={cfg.num_warps} num_stages={cfg.num_stages}")
                for kernel in kernels_of:
                    assert (kernel, "fp32" if fp32 else "bf16", label) in compiled, (family, wide, fp32, kernel, label)


def test_ops_stand_alone():
    # the ops import only kernels/ helpers (tiles, tuning, the self-check's command line): no benchmark,
    # no report, no model code, no each other, counting imports inside functions; bench.py and aot.py
    # import the ops, not the reverse
    helpers = {"tiles", "tuning", "selfcheck"}
    for op in ("bank_attention", "similarity", *helpers):
        tree = ast.parse((ROOT / "kernels" / f"{op}.py").read_text())
        names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        names |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        local = {n for n in names if n.startswith("kernels") or n in ("model", "cmki", "train", "eval", "data")}
        assert local <= {f"kernels.{h}" for h in helpers}, (op, local)
