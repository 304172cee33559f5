"""A byte-level BPE tokenizer trained on the corpus's train split, saved as the model directory's tokenizer files."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from engine.tokenizer import END_OF_TEXT


def train_tokenizer(texts: Iterable[str], vocab_size: int = 4096) -> Tokenizer:
    """GPT-2-style byte-level BPE: any text encodes (no unknown token); end of text is the one special token."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[END_OF_TEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=True,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def save_tokenizer(tokenizer: Tokenizer, path: Path) -> int:
    """Write tokenizer.json and tokenizer_config.json (read by our engine and transformers); return the eos id."""
    path.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(path / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": END_OF_TEXT,
        "eos_token": END_OF_TEXT,
        "unk_token": END_OF_TEXT,
        "model_max_length": 1 << 30,
    }
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    eos = tokenizer.token_to_id(END_OF_TEXT)
    assert eos is not None
    return eos
