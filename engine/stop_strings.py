"""Stop strings found in streamed text at a cost per character that does not grow with their number.

A request's stop strings become one Aho-Corasick automaton, built once; each sequence keeps only its state
(an int) and feeds the automaton the characters each new token adds. The first stop string to be completed
wins (the one ending earliest; of those ending at the same character, the longest), so a stop string that
spans tokens is found as soon as its last character arrives.
"""

from __future__ import annotations


class StopStrings:
    """The automaton of a list of non-empty stop strings."""

    def __init__(self, stops: list[str]) -> None:
        if not stops or not all(stops):
            raise ValueError("stop strings must be a non-empty list of non-empty strings")
        self._next: list[dict[str, int]] = [{}]
        self._fail: list[int] = [0]
        self._match: list[str | None] = [None]  # the longest stop string ending at each state
        for stop in stops:
            state = 0
            for char in stop:
                nxt = self._next[state].get(char)
                if nxt is None:
                    nxt = len(self._next)
                    self._next[state][char] = nxt
                    self._next.append({})
                    self._fail.append(0)
                    self._match.append(None)
                state = nxt
            self._match[state] = stop
        self._link_failures()

    def _link_failures(self) -> None:
        """Breadth-first: each state's failure link is the longest proper suffix that is also a trie state."""
        queue = list(self._next[0].values())
        for state in queue:  # grows while it is walked
            for char, child in self._next[state].items():
                fallback = self._fail[state]
                while fallback and char not in self._next[fallback]:
                    fallback = self._fail[fallback]
                target = self._next[fallback].get(char, 0)
                self._fail[child] = target if target != child else 0
                if self._match[child] is None:
                    self._match[child] = self._match[self._fail[child]]
                queue.append(child)

    def feed(self, state: int, text: str) -> tuple[int, int, str | None]:
        """Advance `state` over `text`. Returns (new state, characters of text consumed, stop string): the stop
        string completed first, with text consumed up to its end, or None with all of text consumed."""
        nexts, fail, match = self._next, self._fail, self._match
        for i, char in enumerate(text):
            while state and char not in nexts[state]:
                state = fail[state]
            state = nexts[state].get(char, 0)
            if match[state] is not None:
                return state, i + 1, match[state]
        return state, len(text), None
