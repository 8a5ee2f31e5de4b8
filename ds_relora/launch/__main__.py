"""``python -m ds_relora.launch``: the per-node launcher the launch scripts start (see ``launchers``)."""

import sys

from ds_relora.launch.node import main

sys.exit(main())
