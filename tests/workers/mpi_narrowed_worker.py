"""The worker under mpirun, on a node that offers only the addresses given as the first argument
(comma-separated) instead of all of ``hostname -I``: how tests/cluster/test_mpirun.py makes MPI
discovery find no address every node reaches while MPI's own traffic still flows (it uses the
other network). Usage: ``mpirun ... python mpi_narrowed_worker.py ADDR[,ADDR] --config CFG``."""

from __future__ import annotations

import sys

from ds_relora import worker

if __name__ == "__main__":
    offered = sys.argv[1].split(",")
    worker.host_addresses = lambda: offered
    sys.exit(worker.main(sys.argv[2:]))
