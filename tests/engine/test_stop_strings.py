"""Stop strings: one automaton finds exactly what a direct search finds, however the text is split into tokens,
and its cost per character does not grow with the number of stop strings."""

from __future__ import annotations

import random
import time

import pytest

from engine.stop_strings import StopStrings


def first_stop(stops: list[str], text: str) -> tuple[int, str] | None:
    """The direct search: the first end position where some stop string ends, and the longest one ending there."""
    for end in range(1, len(text) + 1):
        hits = [s for s in stops if text[:end].endswith(s)]
        if hits:
            return end, max(hits, key=len)
    return None


def fed_in_pieces(matcher: StopStrings, text: str, rng: random.Random) -> tuple[int, str] | None:
    state, position = 0, 0
    while position < len(text):
        piece = text[position : position + rng.randint(1, 5)]
        state, used, stop = matcher.feed(state, piece)
        if stop is not None:
            return position + used, stop
        position += len(piece)
    return None


def test_the_automaton_agrees_with_a_direct_search_over_random_token_splits() -> None:
    rng = random.Random(0)
    for _ in range(3000):
        stops = ["".join(rng.choice("ab c") for _ in range(rng.randint(1, 5))) for _ in range(rng.randint(1, 6))]
        text = "".join(rng.choice("abc ") for _ in range(rng.randint(0, 30)))
        assert fed_in_pieces(StopStrings(stops), text, rng) == first_stop(stops, text), (stops, text)


def test_unicode_and_overlapping_stops() -> None:
    matcher = StopStrings(["ünïcode", "code!", "odé"])
    state, used, stop = matcher.feed(0, "the ünïcod")
    assert (used, stop) == (10, None)
    _, used, stop = matcher.feed(state, "e! more")  # completed by the next token's first character
    assert (used, stop) == (1, "ünïcode")
    with pytest.raises(ValueError, match="non-empty"):
        StopStrings(["ok", ""])


def test_cost_per_character_does_not_grow_with_the_number_of_stop_strings() -> None:
    rng = random.Random(1)
    text = "".join(rng.choice("abcdefgh ") for _ in range(200_000))

    def seconds(stops: list[str]) -> float:
        matcher = StopStrings(stops)
        best = float("inf")
        for _ in range(3):
            start = time.perf_counter()
            state = 0
            for i in range(0, len(text), 4):  # a token's worth at a time
                state, _, _ = matcher.feed(state, text[i : i + 4])
            best = min(best, time.perf_counter() - start)
        return best

    few = [f"zz{i}" for i in range(2)]
    many = [f"zz{i}" for i in range(5000)] + ["".join(rng.choice("abcdefgh") for _ in range(12)) + "z"] * 10
    # A scan per stop string would be ~2,500x slower with the long list; one automaton stays about even.
    assert seconds(many) < 3 * seconds(few)
