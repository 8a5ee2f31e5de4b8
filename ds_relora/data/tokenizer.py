"""Tokenizers: load a pretrained one, or train a byte-level BPE on the corpus.

``transformers`` is imported inside the functions: the training workers import
``ds_relora.data`` for the packed dataset alone, and should not pay for it there.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Iterable

import numpy as np

from ds_relora.errors import ConfigError, DataError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

EOS_TOKEN = "<|endoftext|>"
# 256 byte symbols + the EOS special token: below this the BPE has no room for a single merge.
MIN_BPE_VOCAB = 258


def train_bpe(texts: Iterable[str], vocab_size: int) -> "PreTrainedTokenizerFast":
    """A byte-level BPE of ``vocab_size`` tokens (EOS ``<|endoftext|>`` included) trained on ``texts``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: PLC0415  (tokenizers is needed only when text is tokenized)
    from transformers import PreTrainedTokenizerFast  # noqa: PLC0415  (transformers takes seconds to import; only code that builds a model needs it)

    if vocab_size < MIN_BPE_VOCAB:
        raise ConfigError(f"prepare.vocab_size={vocab_size} is too small for a byte-level BPE: set it to at least {MIN_BPE_VOCAB}")
    backend = Tokenizer(models.BPE())
    # Byte-level pre-tokenization means any text (code, any script) encodes without an unknown token.
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=EOS_TOKEN)


def load_pretrained_tokenizer(name_or_path: str) -> "PreTrainedTokenizerFast":
    """``AutoTokenizer.from_pretrained`` with one-line errors; the tokenizer must have an EOS token."""
    from transformers import AutoTokenizer  # noqa: PLC0415  (transformers takes seconds to import; only code that builds a model needs it)

    try:
        tok = AutoTokenizer.from_pretrained(name_or_path)
    except Exception as exc:  # offline hub, bad path, missing files: all need the same hint
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise DataError(
            f"cannot load tokenizer {name_or_path!r} ({first}): pass a local tokenizer folder or a reachable HF name, "
            "or set prepare.tokenizer: null to train a BPE"
        ) from exc
    check_has_eos(tok, name_or_path)
    return tok


def check_has_eos(tok, name: str) -> None:
    # Documents are separated by EOS in the packed stream; without it they would run together.
    if tok.eos_token_id is None:
        raise DataError(f"tokenizer {name!r} has no EOS token: use a tokenizer that defines one, or set prepare.tokenizer: null to train a BPE")


def load_tokenizer(data_dir: str | Path) -> "PreTrainedTokenizerFast":
    """The tokenizer saved by ``prepare_data`` in ``data_dir``."""
    from transformers import AutoTokenizer  # noqa: PLC0415  (transformers takes seconds to import; only code that builds a model needs it)

    from ds_relora.data.dataset import read_data_meta  # noqa: PLC0415  (keeps this module's import light (no torch) for the CLI's start-up)

    meta = read_data_meta(data_dir)
    path = Path(data_dir) / meta.get("tokenizer", "tokenizer")
    if not path.is_dir():
        raise DataError(f"prepared data folder {data_dir} has no tokenizer folder {path.name}/: re-run `ds-relora prepare-data`")
    return AutoTokenizer.from_pretrained(str(path))


def encode_batch(tok, texts: list[str]) -> list[list[int]]:
    """Token ids of each text, no special tokens added; batched in Rust when the tokenizer allows."""
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None:
        # Calling the backend directly skips BatchEncoding and the model_max_length warning.
        fast = getattr(backend, "encode_batch_fast", backend.encode_batch)
        return [enc.ids for enc in fast(texts, add_special_tokens=False)]
    return tok(texts, add_special_tokens=False)["input_ids"]


def id_bound(tok) -> int:
    """One more than the largest token id the tokenizer can emit (normally ``len(tok)``)."""
    vocab = tok.get_vocab()
    return max(len(tok), max(vocab.values(), default=-1) + 1)


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype("<u2") if vocab_size <= 65535 else np.dtype("<u4")
