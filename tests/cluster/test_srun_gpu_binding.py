"""srun with per-task GPU binding (--gpus-per-task=1, --gpu-bind): every task sees one GPU, as
device 0, while SLURM_LOCALID still counts the node's tasks. The rank must use the one GPU it
sees (DeepSpeed and the worker take GPU LOCAL_RANK), or stop with one line when the binding
gives a task several GPUs it cannot tell apart. Environment variables only: no GPU needed."""

from __future__ import annotations

import pytest

from ds_relora.errors import LaunchError
from ds_relora.launch.hosts import slurm_env

TASK = {"SLURM_PROCID": "3", "SLURM_NTASKS": "8", "SLURM_JOB_NODELIST": "gpu[01-02]", "SLURM_JOB_ID": "77"}


@pytest.mark.parametrize("local_id,visible", [("1", "1"), ("3", "3"), ("2", "0")])
def test_per_task_binding_uses_the_one_visible_gpu(local_id, visible):
    env = slurm_env({**TASK, "SLURM_LOCALID": local_id, "CUDA_VISIBLE_DEVICES": visible})
    assert env["LOCAL_RANK"] == "0" and env["RANK"] == "3"


def test_node_wide_visibility_keeps_the_local_id():
    assert slurm_env({**TASK, "SLURM_LOCALID": "3", "CUDA_VISIBLE_DEVICES": "0,1,2,3"})["LOCAL_RANK"] == "3"
    assert slurm_env({**TASK, "SLURM_LOCALID": "3"})["LOCAL_RANK"] == "3"  # CPU: nothing to map


def test_several_gpus_per_task_is_refused_in_one_line():
    with pytest.raises(LaunchError) as exc:
        slurm_env({**TASK, "SLURM_LOCALID": "3", "CUDA_VISIBLE_DEVICES": "6,7"})
    msg = str(exc.value)
    assert "\n" not in msg and "SLURM_LOCALID=3" in msg and "CUDA_VISIBLE_DEVICES=6,7" in msg and "--gpus-per-task=1" in msg
