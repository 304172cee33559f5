"""A request's routing budget, carried by each of its tokens as one row of per-token controls (engine.routing
applies them). Free of torch, so the server's request workers can build and check it."""

from __future__ import annotations

import math
from dataclasses import dataclass

# Columns of the per-token routing controls.
EXPERTS_PER_TOKEN, MIN_PROB, KEEP_TOP, MIN_SIMILARITY = range(4)
NUM_CONTROLS = 4
UNLIMITED = 1 << 20  # an experts_per_token or keep_top no slot reaches


@dataclass(frozen=True)
class TokenRouting:
    """One request's routing budget, carried by each of its tokens through the step (vLLM-style extra body
    `"moe": {...}` on the server). Unset fields keep the model's routing.

    experts_per_token: at most the layer's top-k; the kept slots are renormalized where the model renormalizes.
    min_prob: drop routed experts below this probability (as RoutingPolicy.min_prob; the larger one applies).
    keep_top, min_similarity: batch-aware substitution of generated tokens' slots beyond the first keep_top
        (engine.routing describes it); None turns it off.
    """

    experts_per_token: int | None = None
    min_prob: float = 0.0
    keep_top: int | None = None
    min_similarity: float = 0.0

    def validate(self, top_k: int) -> None:
        """Raise ValueError naming the field that is out of range for a model routing top_k experts."""
        if self.experts_per_token is not None and not 1 <= self.experts_per_token <= top_k:
            raise ValueError(f"experts_per_token must be in 1..{top_k}, got {self.experts_per_token}")
        if not 0.0 <= self.min_prob < 1.0:
            raise ValueError(f"min_prob must be in [0, 1), got {self.min_prob}")
        if self.keep_top is not None and not 0 <= self.keep_top <= top_k:
            raise ValueError(f"substitution keep_top must be in 0..{top_k}, got {self.keep_top}")
        if not -1.0 <= self.min_similarity <= math.inf:
            raise ValueError(f"substitution min_similarity must be at least -1, got {self.min_similarity}")

    @property
    def cache_salt(self) -> bytes:
        """Mixed into prefix-cache digests: keys and values computed under another budget differ (prompt tokens
        under experts_per_token and min_prob; generated tokens, whose blocks are cached too, also under
        substitution), so a prefix is shared only between requests whose tokens route alike."""
        rows = (self.row(generated=False), self.row(generated=True))
        default = TokenRouting()
        if rows == (default.row(generated=False), default.row(generated=True)):
            return b""
        return f"routing:{rows!r}".encode()

    def row(self, generated: bool) -> tuple[float, float, float, float]:
        """The controls of one token: a generated token substitutes, a prompt token never does."""
        substitutes = generated and self.keep_top is not None
        return (
            float(self.experts_per_token or UNLIMITED),
            self.min_prob,
            float(self.keep_top if substitutes and self.keep_top is not None else UNLIMITED),
            self.min_similarity if substitutes else math.inf,
        )


# The controls of rows that are not a request's tokens (padding of a fixed-size batch, warm-up): they do not
# widen the step's kept union, never substitute, and route as the model does.
PADDING_ROW = (float(UNLIMITED), 0.0, 0.0, math.inf)
