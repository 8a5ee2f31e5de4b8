"""The tests' harness, one module per job (tests/ is on sys.path, see tests/conftest.py):

- ``harness.ranks``: run N local ranks of one command (gloo on CPU) to the end, with a hang
  timeout; every multi-rank test and benchmarks/common.launch_ranks start their ranks here.
- ``harness.configs``: the tiny run config (and its variants for the method-invariance and the
  real-launch tests), written as YAML.
- ``harness.checks``: what a test checks a run against: its metrics.jsonl, recorded tolerances,
  one-line errors.
- ``harness.launches``: real launches (``ds-relora train`` with a launcher, or ranks started by
  hand that a test watches one by one): processes in their own sessions, killed as a group.

The rendezvous port comes from ``ds_relora.launch.hosts.free_port`` (the package's one copy).
"""

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
