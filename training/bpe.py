"""A byte-level BPE tokenizer trained on the corpus's train split (saved with engine.tokenizer.save_tokenizer_files)."""

from __future__ import annotations

from collections.abc import Iterable

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
