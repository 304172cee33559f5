"""The corpus: built from the real offline sources, split deterministically, and from user files."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from corpus.splits import DEFAULT_CORPUS_DIR, SPLITS, CorpusError, read_split
from corpus.tokens import encode_documents, eval_windows
from training.bpe import train_tokenizer
from training.corpus import build_corpus, split_of
from training.data import train_batch


@pytest.mark.skipif(shutil.which("apt-get") is None, reason="the Austen source comes from Debian's apt-get")
def test_package_sources_build_the_bundled_split(tmp_path: Path) -> None:
    """Fetch all three packages, as `moe-train corpus` does, and rebuild the committed held-out splits exactly."""
    manifest = build_corpus(tmp_path / "corpus", cache_dir=tmp_path / "cache")
    splits = manifest["splits"]
    assert isinstance(splits, dict)
    assert sum(s["bytes"] for s in splits.values()) > 10_000_000
    committed = json.loads((DEFAULT_CORPUS_DIR / "manifest.json").read_text())
    assert splits == committed["splits"]
    for split in ("validation", "test"):
        assert (tmp_path / "corpus" / f"{split}.jsonl").read_bytes() == (
            DEFAULT_CORPUS_DIR / f"{split}.jsonl"
        ).read_bytes()
    sources = {json.loads(line)["source"] for line in (tmp_path / "corpus" / "train.jsonl").open()}
    assert sources == {"shakespeare", "kjv", "austen"}


def test_committed_test_split_is_readable_by_name() -> None:
    test = read_split("test")
    assert len(test) > 50 and sum(len(t) for t in test) > 400_000
    assert set(test).isdisjoint(read_split("validation"))


def test_split_is_a_function_of_the_document_id() -> None:
    ids = [f"doc/{i}" for i in range(4000)]
    assignment = [split_of(i) for i in ids]
    assert assignment == [split_of(i) for i in ids]
    share = {s: assignment.count(s) / len(ids) for s in SPLITS}
    assert 0.03 < share["test"] < 0.07 and 0.03 < share["validation"] < 0.07


def test_user_files_and_directories(tmp_path: Path) -> None:
    texts = tmp_path / "texts"
    (texts / "sub").mkdir(parents=True)
    for i in range(80):
        (texts / ("sub" if i % 2 else "") / f"{i}.txt").write_text(f"Document number {i}.\n")
    (texts / "ignored.bin").write_bytes(b"\x00\x01")
    manifest = build_corpus(tmp_path / "c", files=[texts])
    counts = {s: v["documents"] for s, v in manifest["splits"].items()}
    assert sum(counts.values()) == 80 and all(counts.values())
    again = build_corpus(tmp_path / "c2", files=[texts])
    assert again["splits"] == manifest["splits"]


def test_bad_corpus_inputs_are_named(tmp_path: Path) -> None:
    with pytest.raises(CorpusError, match="absent.txt: no such file"):
        build_corpus(tmp_path / "c", files=[tmp_path / "absent.txt"])
    assert not (tmp_path / "c.tmp").exists()
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(CorpusError, match="latin1.txt: not UTF-8"):
        build_corpus(tmp_path / "c", files=[tmp_path / "latin1.txt"])
    (tmp_path / "one.txt").write_text("only one document")
    with pytest.raises(CorpusError, match="got no documents"):
        build_corpus(tmp_path / "c", files=[tmp_path / "one.txt"])
    assert not (tmp_path / "c").exists() and not (tmp_path / "c.tmp").exists()
    with pytest.raises(CorpusError, match="unknown split 'dev'"):
        read_split("dev")
    with pytest.raises(CorpusError, match="moe-train corpus"):
        read_split("train", tmp_path / "nowhere")


def test_token_stream_batches_and_windows() -> None:
    tokenizer = train_tokenizer(["the cat sat on the mat"] * 20, vocab_size=280)
    stream = encode_documents(tokenizer, ["the cat", "sat on the mat"])
    eos = tokenizer.token_to_id("<|endoftext|>")
    assert stream.tolist().count(eos) == 2 and int(stream[-1]) == eos
    long = encode_documents(tokenizer, ["the cat sat on the mat"] * 30)
    a, b = train_batch(long, 4, 8, seed=1, step=5), train_batch(long, 4, 8, seed=1, step=5)
    assert a.shape == (4, 9) and (a == b).all() and not (a == train_batch(long, 4, 8, seed=1, step=6)).all()
    windows = eval_windows(long, 8)
    assert windows.shape[1] == 9 and (windows[1, 0] == windows[0, 8])


def test_cli_refuses_to_overwrite_the_bundled_corpus_with_user_files(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("text")
    result = subprocess.run(
        [sys.executable, "-m", "training.cli", "corpus", "--files", str(tmp_path / "a.txt")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2 and "pass --out for a corpus of your own files" in result.stderr
    assert json.loads((DEFAULT_CORPUS_DIR / "manifest.json").read_text())["sources"][0]["name"] == "shakespeare"
