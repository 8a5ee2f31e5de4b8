"""``ds-relora train`` whose launch plan starts another worker module (test-only).

``python launch_swap.py MODULE train --config X --set ...`` runs the real CLI path (plan_run,
resolved config, build_launch, run_plan and the real launcher) with ``--module MODULE`` (or
``-m MODULE`` under mpirun) in place of ``ds_relora.worker``. MODULE must be importable by the
ranks, e.g. through PYTHONPATH.
"""

import sys

from ds_relora import cli
from ds_relora.launch import launchers as launch

if __name__ == "__main__":
    launch.WORKER = sys.argv[1]  # build_launch reads the module-level name at call time
    sys.exit(cli.main(sys.argv[2:]))
