import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def prepared_data(tmp_path_factory):
    """A small prepared corpus (stdlib sources, trained BPE) shared by the whole session."""
    from ds_relora.config import PrepareConfig
    from ds_relora.data import prepare_data

    out = tmp_path_factory.mktemp("data") / "stdlib"
    prepare_data(PrepareConfig(source="stdlib", max_documents=120, vocab_size=512, val_fraction=0.1), out,
                 log=lambda _m: None)
    return out
