"""Worst 1-rank vs N-rank loss difference per method and ZeRO stage, on each CPU kernel set.

The invariance tests (tests/test_methods_engine.py, tests/test_zero_merge.py, ...) bound how far
an N-rank run may drift from the 1-rank run of the same global batch. A bound is a claim only if
it holds on every CPU the suite meets (AMD and Intel, AVX2 and AVX-512 kernels), so this script
measures the drift on the kernel sets this machine can run, each in fresh processes:

  native       whatever torch and MKL pick on this CPU
  avx2         ATEN_CPU_CAPABILITY=avx2 (ATen's vectorised kernels; = native on an AVX2-only CPU)
  default      ATEN_CPU_CAPABILITY=default (ATen's scalar kernels)
  mkl-avx2     ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 (MKL's GEMMs limited to AVX2)
  mkl-sse42    ATEN_CPU_CAPABILITY=default MKL_ENABLE_INSTRUCTIONS=SSE4_2 (both on their oldest path)

The runs are the invariance tests' own (tests/harness/configs.py ``method_run_config``): the tiny preset,
fp32, 24 steps, global batch 8 (micro-batch 4: 1 rank accumulates 2 micro-batches, 2 ranks one
each), no warm start, ReLoRA/ReMoRA merges and GaLore projector updates every 8 steps, ZeRO-3
with W partitioned. Per method
and stage it prints max_s |loss_N(s) - loss_1(s)| / |loss_1(s)| and the step where it happens.

    python benchmarks/invariance/run.py                         # every kernel set, ~12 min on 2 cores
    python benchmarks/invariance/run.py --kernels default --methods galore,remora
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
from benchmarks.common import emit, launch_ranks, load_average, machine_info, md_table  # noqa: E402

KERNEL_SETS = {
    "native": {},
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2"},
    "default": {"ATEN_CPU_CAPABILITY": "default"},
    "mkl-avx2": {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
    "mkl-sse42": {"ATEN_CPU_CAPABILITY": "default", "MKL_ENABLE_INSTRUCTIONS": "SSE4_2"},
}
METHODS = ("full", "control", "lora", "relora", "mora", "remora", "galore")
WORKER = REPO / "tests" / "workers" / "run_configs.py"


def method_config(data: Path, run_dir: Path, method: str, stage: int) -> dict:
    """The invariance tests' run (tests/harness/configs.py ``method_run_config``) for any method."""
    from harness.configs import method_run_config

    return method_run_config(data, run_dir, method, stage)


def losses(run_dir: Path) -> list[float]:
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    by_step = {r["step"]: r["loss"] for r in recs if r["type"] == "step"}
    return [by_step[s] for s in sorted(by_step)]


def worst(other: list[float], ref: list[float]) -> tuple[float, int]:
    diffs = [(abs(a - b) / abs(b), step) for step, (a, b) in enumerate(zip(other, ref), start=1)]
    assert len(other) == len(ref), (len(other), len(ref))
    return max(diffs)


def measure(kernel: str, data: Path, root: Path, methods, stages, world: int) -> list[dict]:
    import yaml

    env = {"OMP_NUM_THREADS": "1", **KERNEL_SETS[kernel]}
    configs = {}
    for method in methods:
        for stage, nranks in [(0, 1)] + [(s, world) for s in stages]:
            run_dir = root / kernel / f"{method}-z{stage}-w{nranks}"
            path = run_dir.with_suffix(".yaml")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(yaml.safe_dump(method_config(data, run_dir, method, stage)))
            configs[(method, stage, nranks)] = (path, run_dir)
    for nranks in (1, world):
        paths = [str(p) for (m, s, n), (p, _) in configs.items() if n == nranks]
        launch_ranks(WORKER, paths, nranks, timeout=3600, env=env)
    rows = []
    for method in methods:
        ref = losses(configs[(method, 0, 1)][1])
        for stage in stages:
            rel, step = worst(losses(configs[(method, stage, world)][1]), ref)
            rows.append({"kernel": kernel, "method": method, "stage": stage, "world": world,
                         "max_rel": rel, "step": step})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kernels", default=",".join(KERNEL_SETS), help="comma list of " + ", ".join(KERNEL_SETS))
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--stages", default="0,1,2,3")
    ap.add_argument("--world", type=int, default=2, help="ranks of the run compared with 1 rank (global batch 8)")
    args = ap.parse_args()
    from ds_relora.config import PrepareConfig
    from ds_relora.data import prepare_data

    kernels = args.kernels.split(",")
    unknown = [k for k in kernels if k not in KERNEL_SETS]
    if unknown:
        sys.exit(f"error: unknown kernel set {unknown[0]!r}: choose from {', '.join(KERNEL_SETS)}")
    methods, stages = args.methods.split(","), [int(s) for s in args.stages.split(",")]
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    for key in ("ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS"):
        os.environ.pop(key, None)  # an inherited setting would make "native" something else
    print(f"# {machine_info()}; load {load_average()}", flush=True)
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="ds_relora_invariance_") as tmp:
        root = Path(tmp)
        data = root / "stdlib"
        # The test suite's corpus (tests/conftest.py prepared_data).
        prepare_data(PrepareConfig(source="stdlib", max_documents=120, vocab_size=512, val_fraction=0.1), data,
                     log=lambda _m: None)
        rows = []
        for kernel in kernels:
            kernel_rows = measure(kernel, data, root, methods, stages, args.world)
            rows += kernel_rows
            for row in kernel_rows:
                emit(row)
    print()
    table = [[m] + [max((r["max_rel"] for r in rows if r["method"] == m and r["stage"] == s and r["kernel"] == k),
                        default=float("nan")) for k in kernels for s in stages] for m in methods]
    headers = ["method"] + [f"{k} z{s}" for k in kernels for s in stages]
    print(md_table(headers, [[row[0]] + [f"{v:.1e}" for v in row[1:]] for row in table]))
    overall = max(rows, key=lambda r: r["max_rel"])
    print(f"\nworst: {overall['max_rel']:.2e} ({overall['method']}, ZeRO-{overall['stage']}, "
          f"{overall['kernel']}, step {overall['step']}); {time.time() - started:.0f} s")


if __name__ == "__main__":
    main()
