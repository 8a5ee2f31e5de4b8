"""``python -m ds_relora.gpu``: the GPU first-contact check (see ``check``)."""

import os
import sys

from ds_relora.gpu.check import main

code = main()
sys.stdout.flush()
# Skip interpreter teardown: native NCCL/gloo/DeepSpeed threads occasionally abort at exit.
os._exit(code)
