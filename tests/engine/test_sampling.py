"""Sampling parameters: seeds, filters, stops, lengths, logprobs, n, and streaming-safe detokenization."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine import LLM, SamplingParams
from engine.random_checkpoint import write_tokenizer
from engine.sampler import apply_top_k_top_p
from engine.tokenizer import IncrementalDetokenizer, ModelTokenizer
from tests.conftest import copy_checkpoint

PROMPT = list(range(40, 60))


@pytest.fixture(scope="module")
def llm(tiny_model: Path) -> LLM:
    return LLM(tiny_model, dtype="float32", device="cpu", max_model_len=128)


def tokens(llm: LLM, params: SamplingParams, prompt: list[int] = PROMPT) -> list[int]:
    return llm.generate([prompt], params, use_tqdm=False)[0].outputs[0].token_ids


def test_seed_gives_same_tokens_whatever_the_batch(llm: LLM) -> None:
    seeded = SamplingParams(temperature=1.0, seed=1234, max_tokens=20, ignore_eos=True)
    alone = tokens(llm, seeded)
    others = [SamplingParams(temperature=0.8, max_tokens=n, ignore_eos=True) for n in (5, 30, 12)]
    batch = llm.generate(
        [[7, 8, 9], PROMPT, list(range(100, 140)), [1]], [others[0], seeded, others[1], others[2]], use_tqdm=False
    )
    assert batch[1].outputs[0].token_ids == alone
    assert tokens(llm, SamplingParams(temperature=1.0, seed=99, max_tokens=20, ignore_eos=True)) != alone


def test_filters_that_leave_one_token_are_greedy(llm: LLM) -> None:
    greedy = tokens(llm, SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True))
    assert tokens(llm, SamplingParams(temperature=1.0, top_k=1, max_tokens=10, ignore_eos=True)) == greedy
    assert tokens(llm, SamplingParams(temperature=1.0, top_p=1e-6, max_tokens=10, ignore_eos=True)) == greedy


def test_top_k_top_p_masks() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.5, 0.3, 0.15, 0.05]]))
    masked = apply_top_k_top_p(logits, torch.tensor([2, 0]), torch.tensor([1.0, 0.7]))
    assert torch.isfinite(masked).tolist() == [[True, True, False, False], [True, True, False, False]]
    masked = apply_top_k_top_p(logits, torch.tensor([0, 0]), torch.tensor([1.0, 0.81]))
    assert torch.isfinite(masked).sum(dim=-1).tolist() == [4, 3]


def test_stop_token_ids_and_eos(llm: LLM) -> None:
    greedy = tokens(llm, SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True))
    stop_at = greedy[4]
    output = llm.generate(
        [PROMPT], SamplingParams(temperature=0.0, max_tokens=10, stop_token_ids=[stop_at]), use_tqdm=False
    )
    completion = output[0].outputs[0]
    assert completion.token_ids == greedy[: greedy.index(stop_at) + 1]
    assert completion.finish_reason == "stop" and completion.stop_reason == stop_at
    with_min = SamplingParams(temperature=0.0, max_tokens=10, stop_token_ids=[stop_at], min_tokens=8)
    assert stop_at not in tokens(llm, with_min)[:8]


@pytest.fixture(scope="module")
def ascii_llm(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> LLM:
    """The tiny model with LM-head rows of non-printable tokens zeroed, so greedy text is plain ASCII."""
    path = copy_checkpoint(tiny_model, tmp_path_factory.mktemp("ascii"))
    tensors = load_file(str(path / "model.safetensors"))
    tokenizer = ModelTokenizer(path)
    printable = [tokenizer.hf.token_to_id(chr(c)) for c in range(33, 127)]
    keep = torch.zeros(tensors["lm_head.weight"].shape[0], 1)
    keep[printable] = 1.0
    tensors["lm_head.weight"] = tensors["lm_head.weight"] * keep
    save_file(tensors, str(path / "model.safetensors"))
    return LLM(path, dtype="float32", device="cpu", max_model_len=128)


def test_stop_strings_truncate_text(ascii_llm: LLM) -> None:
    greedy = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    text = ascii_llm.generate([PROMPT], greedy, use_tqdm=False)[0].outputs[0].text
    assert len(text) == 24 and text.isascii()
    at = next(i for i in range(3, 20) if text.find(text[i : i + 2]) == i)
    stop = text[at : at + 2]
    params = SamplingParams(temperature=0.0, max_tokens=24, stop=[stop])
    out = ascii_llm.generate([PROMPT], params, use_tqdm=False)[0].outputs[0]
    assert out.text == text[:at] and out.finish_reason == "stop" and out.stop_reason == stop
    params = SamplingParams(temperature=0.0, max_tokens=24, stop=[stop], include_stop_str_in_output=True)
    assert ascii_llm.generate([PROMPT], params, use_tqdm=False)[0].outputs[0].text == text[: at + 2]


def test_streamed_text_holds_back_partial_stop_strings(ascii_llm: LLM) -> None:
    engine = ascii_llm.engine
    engine.add_request("stream", PROMPT, SamplingParams(temperature=0.0, max_tokens=12, stop=["never-in-output"]))
    seen = []
    while engine.has_unfinished_requests():
        for output in engine.step():
            seen.append((output.outputs[0].text, len(output.outputs[0].token_ids), output.finished))
    holdback = len("never-in-output") - 1
    for text, count, finished in seen:
        assert len(text) == (count if finished else max(0, count - holdback))


def test_max_tokens_and_zero_tokens(llm: LLM) -> None:
    out = llm.generate([PROMPT], SamplingParams(max_tokens=7, ignore_eos=True), use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) == 7 and out.finish_reason == "length"
    scored = llm.generate([PROMPT], SamplingParams(max_tokens=0, prompt_logprobs=0), use_tqdm=False)[0]
    assert scored.outputs[0].token_ids == [] and scored.outputs[0].finish_reason == "length"
    assert len(scored.prompt_logprobs) == len(PROMPT) and scored.prompt_logprobs[0] is None


def test_logprobs_hold_chosen_token_and_top_n(llm: LLM) -> None:
    out = llm.generate(
        [PROMPT], SamplingParams(temperature=1.0, seed=3, max_tokens=6, logprobs=3, ignore_eos=True), use_tqdm=False
    )
    completion = out[0].outputs[0]
    assert len(completion.logprobs) == 6
    total = 0.0
    for token, entry in zip(completion.token_ids, completion.logprobs):
        assert token in entry and 3 <= len(entry) <= 4
        ranked = sorted((lp.rank, lp.logprob) for t, lp in entry.items() if lp.rank <= 3)
        assert [r for r, _ in ranked[:3]] == [1, 2, 3]
        assert all(a >= b for (_, a), (_, b) in itertools.pairwise(ranked))
        assert all(lp.logprob <= 0 for lp in entry.values())
        total += entry[token].logprob
    assert math.isclose(completion.cumulative_logprob, total, rel_tol=1e-6)
    tokenizer = llm.get_tokenizer()
    assert all(
        lp.decoded_token == tokenizer.decode([t], skip_special_tokens=False)
        for e in completion.logprobs
        for t, lp in e.items()
    )
    assert tokenizer.decode_token(tokenizer.encode(" ")[0]) == " "


def test_n_completions(llm: LLM) -> None:
    out = llm.generate(
        [PROMPT], SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=8, ignore_eos=True), use_tqdm=False
    )[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1


def test_invalid_params_name_the_field() -> None:
    for kwargs, field in [
        ({"temperature": -1}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"max_tokens": -1}, "max_tokens"),
        ({"n": 0}, "n"),
        ({"min_tokens": 5, "max_tokens": 2}, "min_tokens"),
    ]:
        with pytest.raises(ValueError, match=f"SamplingParams.{field}"):
            SamplingParams(**kwargs)


def test_detokenizer_never_emits_half_a_character(tmp_path: Path) -> None:
    write_tokenizer(tmp_path)
    tokenizer = ModelTokenizer(tmp_path)
    text = "naïve café 日本語 🙂"
    ids = tokenizer.encode(text)
    detokenizer = IncrementalDetokenizer(tokenizer, [])
    pieces = [detokenizer.add(token) for token in ids]
    assert "".join(pieces) == text == detokenizer.text
    assert all("\ufffd" not in piece for piece in pieces)
    assert pieces.count("") >= len(ids) - len(text)  # multi-byte characters wait for their last byte


def test_detokenizer_keeps_the_first_word_space_of_metaspace_tokenizers(tmp_path: Path) -> None:
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers

    sentencepiece_like = HFTokenizer(models.WordLevel({"▁The": 0, "▁capital": 1, "▁Paris": 2, "<unk>": 3}, "<unk>"))
    sentencepiece_like.pre_tokenizer = pre_tokenizers.Metaspace()
    sentencepiece_like.decoder = decoders.Metaspace()
    sentencepiece_like.save(str(tmp_path / "tokenizer.json"))
    tokenizer = ModelTokenizer(tmp_path)
    prompt = tokenizer.encode("The capital")
    detokenizer = IncrementalDetokenizer(tokenizer, prompt)
    assert detokenizer.add(2) == " Paris"
    assert tokenizer.decode(prompt) + detokenizer.text == "The capital Paris"


def test_filters_of_one_row_leave_unfiltered_rows_alone() -> None:
    long_tail = torch.log_softmax(torch.randn(1, 150_000, generator=torch.Generator().manual_seed(0)) * 3, dim=-1)
    logits = long_tail.repeat(2, 1)
    masked = apply_top_k_top_p(logits, torch.tensor([5, 0]), torch.tensor([1.0, 1.0]))
    assert torch.isfinite(masked[0]).sum() == 5
    assert torch.equal(masked[1], logits[1])


def test_request_fields_outside_the_vocabulary_are_rejected(llm: LLM) -> None:
    vocab = llm.engine.model.config.vocab_size
    with pytest.raises(ValueError, match="stop_token_ids holds"):
        llm.engine.add_request("bad-stop", PROMPT, SamplingParams(min_tokens=2, stop_token_ids=[vocab]))
    assert not llm.engine.has_unfinished_requests()
    assert tokens(llm, SamplingParams(max_tokens=3, ignore_eos=True))  # the engine still serves others


def test_forced_tokens_score_a_continuation_as_the_prompt_pass_does(llm: LLM) -> None:
    """Teacher forcing: decode steps emit the given tokens, and their logprobs equal those of scoring the same
    tokens as a prompt (no routing here depends on the batch)."""
    prompt, continuation = list(range(20, 32)), [7, 99, 3, 150, 42, 8]
    forced = SamplingParams(max_tokens=len(continuation), forced_tokens=continuation, logprobs=0, temperature=1.0)
    scored = SamplingParams(max_tokens=0, prompt_logprobs=0)
    decoded, whole = llm.generate([prompt, prompt + continuation], [forced, scored], use_tqdm=False)
    assert decoded.outputs[0].token_ids == continuation
    by_decode = [entry[token].logprob for entry, token in zip(decoded.outputs[0].logprobs, continuation)]
    by_prompt = [whole.prompt_logprobs[len(prompt) + i][token].logprob for i, token in enumerate(continuation)]
    assert by_decode == pytest.approx(by_prompt, abs=1e-5)
    with pytest.raises(ValueError, match="max_tokens must be set and at most the number of forced_tokens"):
        SamplingParams(max_tokens=7, forced_tokens=continuation)
    with pytest.raises(ValueError, match="forced_tokens holds 999999"):
        llm.generate([prompt], SamplingParams(max_tokens=1, forced_tokens=[999999]), use_tqdm=False)
