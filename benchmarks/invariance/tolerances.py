"""The worst case of every invariance tolerance in the test suite, on each CPU kernel set.

Runs the invariance tests (1 rank vs N ranks, ZeRO stage vs stage, launch path vs launch path,
elastic resume, fused vs unfused) once per kernel set, in fresh processes, with
``DS_RELORA_TOLERANCE_LOG`` set: every comparison they make through ``tests/harness/checks.py``
``within_rel``/``within_abs`` is logged with its bound. Prints, per tolerance, the bound, the
worst observed value on each kernel set and the margin (bound / worst). The tests' comments quote
these figures; docs/results.md keeps the table.

    python benchmarks/invariance/tolerances.py                       # native and default, ~15 min
    python benchmarks/invariance/tolerances.py --kernels native,default,mkl-sse42

A failing comparison fails its test but is still logged, so the table shows it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
from benchmarks.common import load_average, machine_info, md_table  # noqa: E402
from benchmarks.invariance.run import KERNEL_SETS  # noqa: E402

TESTS = [
    "tests/test_methods_engine.py::test_same_losses_on_one_rank_and_two_ranks_under_zero_0_1_2_3",
    "tests/test_zero_merge.py::test_same_losses_on_one_rank_and_under_zero_1_2_3",
    "tests/test_trainer.py::test_stages_agree_on_the_same_run",
    "tests/test_checkpoint_elastic.py::test_elastic_resume_continues_the_uninterrupted_run",
    "tests/test_launch_ds_configs.py::test_shipped_ds_config_trains",
    "tests/test_launch_nodes.py::test_two_nodes_match_one_node",
    "tests/test_launch_nodes.py::test_mpirun_discovers_ranks_and_matches_one_node",
    "tests/test_checkpoint_weights.py::test_from_pretrained_streams_the_hf_shards_into_every_stage",
    "tests/test_methods_fused.py::test_zero3_fused_trains_like_zero0_with_dropout",
    "tests/test_methods_fused.py::test_zero3_fused_equals_unfused",
    "tests/test_methods_fused.py::test_zero3_replicated_base_trains_identically_and_stays_consistent",
]


def run_kernel_set(kernel: str, log: Path) -> int:
    env = {k: v for k, v in os.environ.items() if k not in ("ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS")}
    env.update(KERNEL_SETS[kernel])
    env.update({"DS_RELORA_TOLERANCE_LOG": str(log), "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
                "TOKENIZERS_PARALLELISM": "false"})
    venv = REPO / ".venv" / "bin"
    if venv.is_dir():
        env["PATH"] = f"{venv}{os.pathsep}{env.get('PATH', '')}"
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *TESTS]
    return subprocess.run(cmd, cwd=REPO, env=env).returncode


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kernels", default="native,default", help="comma list of " + ", ".join(KERNEL_SETS))
    args = ap.parse_args()
    kernels = args.kernels.split(",")
    unknown = [k for k in kernels if k not in KERNEL_SETS]
    if unknown:
        sys.exit(f"error: unknown kernel set {unknown[0]!r}: choose from {', '.join(KERNEL_SETS)}")
    print(f"# {machine_info()}; load {load_average()}", flush=True)
    started = time.time()
    worst: dict[str, dict[str, float]] = {}
    bounds: dict[str, float] = {}
    codes = {}
    with tempfile.TemporaryDirectory(prefix="ds_relora_tolerances_") as tmp:
        for kernel in kernels:
            log = Path(tmp) / f"{kernel}.jsonl"
            codes[kernel] = run_kernel_set(kernel, log)
            for line in log.read_text().splitlines() if log.exists() else []:
                rec = json.loads(line)
                bounds[rec["what"]] = rec["bound"]
                cell = worst.setdefault(rec["what"], {})
                cell[kernel] = max(cell.get(kernel, 0.0), rec["observed"])
    rows = []
    for what in sorted(worst):
        seen = worst[what]
        top = max(seen.values())
        rows.append([what, f"{bounds[what]:.0e}"] + [f"{seen[k]:.1e}" if k in seen else "-" for k in kernels]
                    + [f"{bounds[what] / top:.0f}x" if top else "exact"])
    print()
    print(md_table(["tolerance", "bound"] + [f"worst, {k}" for k in kernels] + ["margin"], rows))
    print(f"\npytest exit codes: {codes}; {time.time() - started:.0f} s")
    sys.exit(max(codes.values()))


if __name__ == "__main__":
    main()
