"""Text in and out through a checkpoint's tokenizer.json, with streaming-safe incremental detokenization."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers
from tokenizers.decoders import DecodeStream

from engine.config import CheckpointError

END_OF_TEXT = "<|endoftext|>"


class ModelTokenizer:
    """A checkpoint's tokenizer plus the end-of-sequence ids its config files declare."""

    def __init__(self, path: str | Path, config_eos_ids: tuple[int, ...] = ()) -> None:
        path = Path(path)
        file = path / "tokenizer.json"
        if not file.is_file():
            raise CheckpointError(f"{file}: tokenizer.json is missing from the model directory")
        try:
            self.hf = HFTokenizer.from_file(str(file))
        except Exception as exc:  # the tokenizers library raises plain Exception subclasses
            raise CheckpointError(f"{file}: unreadable tokenizer ({exc})") from exc
        self.tokenizer_config = _read_json(path / "tokenizer_config.json")
        self.generation_config = _read_json(path / "generation_config.json")
        self.eos_token_ids = self._eos_ids(config_eos_ids)

    def _eos_ids(self, config_eos_ids: tuple[int, ...]) -> tuple[int, ...]:
        generation_eos = self.generation_config.get("eos_token_id")
        if isinstance(generation_eos, int):
            return (generation_eos,)
        if isinstance(generation_eos, list) and generation_eos:
            return tuple(int(i) for i in generation_eos)
        if config_eos_ids:
            return config_eos_ids
        eos = self.tokenizer_config.get("eos_token")
        eos_text = eos.get("content") if isinstance(eos, dict) else eos
        for text in (eos_text, END_OF_TEXT):
            token_id = self.hf.token_to_id(text) if isinstance(text, str) else None
            if token_id is not None:
                return (token_id,)
        return ()

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.hf.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(token_ids, skip_special_tokens=skip_special_tokens)

    def decode_token(self, token_id: int) -> str:
        """One token's text as a logprob entry shows it (' the', not the byte-level symbol 'Ġthe')."""
        return self.hf.decode([token_id], skip_special_tokens=False)


class IncrementalDetokenizer:
    """Appends one token at a time and never emits half of a multi-byte character.

    The last few prompt tokens seed the stream, so decoders that strip a leading space from the start of a
    text (SentencePiece's Metaspace) keep the space of the first generated word.
    """

    PROMPT_CONTEXT = 5

    def __init__(
        self, tokenizer: ModelTokenizer, prompt_token_ids: list[int], skip_special_tokens: bool = True
    ) -> None:
        self._tokenizer = tokenizer
        context = prompt_token_ids[-self.PROMPT_CONTEXT :]
        self._stream = DecodeStream(ids=context, skip_special_tokens=skip_special_tokens)
        self.text = ""

    def add(self, token_id: int) -> str:
        """Feed a token; return the text it completed (possibly empty)."""
        piece = self._stream.step(self._tokenizer.hf, token_id) or ""
        self.text += piece
        return piece


def _read_json(file: Path) -> dict[str, Any]:
    if not file.is_file():
        return {}
    try:
        data = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{file}: not valid JSON ({exc})") from exc
    return data if isinstance(data, dict) else {}


def byte_level_tokenizer() -> HFTokenizer:
    """A merge-free byte-level BPE tokenizer (256 byte tokens + end of text), for random checkpoints."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {symbol: i for i, symbol in enumerate(sorted(alphabet))}
    tokenizer = HFTokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([END_OF_TEXT])
    return tokenizer


def save_tokenizer_files(tokenizer: HFTokenizer, path: Path) -> int:
    """Write tokenizer.json and a tokenizer_config.json that transformers' AutoTokenizer reads, with end of
    text as the eos (and bos, unk) token; return its id."""
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
    if eos is None:
        raise ValueError(f"the tokenizer has no {END_OF_TEXT} token")
    return eos
