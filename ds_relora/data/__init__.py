"""Data pipeline: corpus -> tokenizer -> packed token shards, and the training-side readers.

``prepare_data`` writes a prepared folder once; ``PackedDataset``,
``DistributedBatchIterator`` and ``validation_batches`` read it in every training worker.
"""

from ds_relora.data.corpus import open_documents
from ds_relora.data.dataset import DistributedBatchIterator, PackedDataset, read_data_meta, validation_batches
from ds_relora.data.prepare import prepare_data
from ds_relora.data.tokenizer import EOS_TOKEN, load_tokenizer, train_bpe

__all__ = [
    "EOS_TOKEN",
    "DistributedBatchIterator",
    "PackedDataset",
    "load_tokenizer",
    "open_documents",
    "prepare_data",
    "read_data_meta",
    "train_bpe",
    "validation_batches",
]
