"""kernels.aot on a machine without a GPU: every kernel variant the launchers pick at the benchmark
shapes compiles for sm_90 (TTIR -> TTGIR -> LLIR -> PTX -> cubin, with the ptxas shipped in the Triton
wheel), and the CPU-side targets hold: 0 spill bytes in 16-bit variants, shared memory within the
H100's 227 KB, executed FLOPs <= 1.25x (bank attention) and <= 1.4x (contrastive loss) of the
algorithmic count, modelled L2 -> SM traffic >= 3x below the earlier kernels' report.

The interpreter the other tests use never runs Triton's GPU compiler, so layout, shared-memory or
dot-shape errors would only show on a GPU. The report runs in a subprocess without TRITON_INTERPRET
(conftest sets it for this process, and a kernel decorated under the interpreter cannot be compiled).
bf16 and fp32 are compiled here (fp16 takes the bf16 code paths); `python -m kernels.aot` does all
three. A first run compiles for a minute or two on 2 cores; Triton's cache makes reruns quick.
"""
import ast
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BEFORE = ROOT / "benchmarks" / "kernels_aot_before.json"


def test_kernels_compile_for_sm90_and_meet_the_cpu_side_targets(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    report = tmp_path / "aot.json"
    proc = subprocess.run([sys.executable, "-m", "kernels.aot", "--dtypes", "bf16,fp32", "--json", str(report),
                           "--before", str(BEFORE)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"sm_90 AOT compile failed:\n{proc.stdout[-6000:]}\n{proc.stderr[-3000:]}"
    data = json.loads(report.read_text())
    kernels = {r["kernel"] for r in data["kernels"]}
    assert {"bank_attention._fwd_kernel", "bank_attention._bwd_kernel", "similarity._lse_kernel",
            "similarity._h_kernel"} <= kernels, kernels
    assert all(r["regs"] > 0 for r in data["kernels"]), "ptxas reported no registers"
    assert sum("L2" in t["target"] for t in data["targets"]) == 2  # both ops against the earlier report
    missed = [t["target"] for t in data["targets"] if not t["met"]]
    assert not missed, "targets not met:\n" + "\n".join(missed)


def test_narrow_variants_compile_for_sm90(tmp_path):
    # d <= 256 takes other tile sizes (64-entry bank tiles, one chunk): compiled at d = 256
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    report = tmp_path / "aot.json"
    proc = subprocess.run([sys.executable, "-m", "kernels.aot", "--dtypes", "bf16,fp32", "--d", "256",
                           "--json", str(report)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"sm_90 AOT compile failed:\n{proc.stdout[-6000:]}\n{proc.stderr[-3000:]}"
    missed = [t["target"] for t in json.loads(report.read_text())["targets"] if not t["met"]]
    assert not missed, "targets not met at d = 256:\n" + "\n".join(missed)


def test_ops_stand_alone():
    # the ops import only the shared tile helpers from kernels/ (no benchmark, no report, no each
    # other), counting imports inside functions; bench.py and aot.py import the ops, not the reverse
    for op in ("bank_attention", "similarity", "tiles"):
        tree = ast.parse((ROOT / "kernels" / f"{op}.py").read_text())
        names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        names |= {n.module + "." + a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module
                  for a in n.names}
        local = {n for n in names if n.startswith("kernels")}
        assert local <= {f"kernels.tiles.{a}" for a in dir(__import__("kernels.tiles").tiles)}, (op, local)
