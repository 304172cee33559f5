"""Keeping expert-parallel engine ranks in lockstep: rank 0 leads, the other ranks replay.

The MoE layers run collectives inside the forward, so every rank must run the same engine steps over the same
requests in the same order. Rank 0 (the engine process, the only rank that talks to the HTTP side) records
each command that changes its engine (add, abort, abort all, set routing, exit) as it applies it, and before
each step broadcasts the commands applied since the last one, with the order to step; every other rank applies
the same commands to its own engine, then steps. While idle, rank 0 broadcasts every heartbeat, so the other
ranks never wait longer than that in a collective.

Unseeded random sampling would draw from each rank's own global generator; rank 0 gives every such request an
explicit random seed before it is applied anywhere, so all ranks sample the same tokens whatever else touched
their generators.
"""

from __future__ import annotations

import dataclasses
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch.distributed as dist

from engine.llm_engine import LLMEngine
from engine.outputs import RequestOutput
from server.engine_messages import HEARTBEAT_INTERVAL_S, AbortAll, AbortRequest, AddRequest, Exit, SetRouting, ToEngine

EngineCommand = AddRequest | AbortRequest | AbortAll | SetRouting | Exit


@dataclass(frozen=True)
class Lockstep:
    """One broadcast from rank 0: commands to apply in order, then whether to run a step."""

    commands: list[EngineCommand]
    step: bool


class LockstepLeader:
    """Rank 0's side: records the commands it applies and broadcasts them before each step."""

    def __init__(self, group: dist.ProcessGroup) -> None:
        self.group = group
        self.pending: list[EngineCommand] = []
        self.last_broadcast = time.monotonic()

    def admit(self, message: ToEngine) -> ToEngine:
        """The message rank 0 applies (an unseeded random request gets a seed); recorded if it changes the
        engine."""
        if isinstance(message, AddRequest) and message.params.seed is None and not message.params.greedy:
            params = dataclasses.replace(message.params, seed=secrets.randbelow(1 << 62))
            message = dataclasses.replace(message, params=params)
        if isinstance(message, EngineCommand):
            self.pending.append(message)
        return message

    def broadcast(self, step: bool) -> None:
        """Send the commands recorded since the last broadcast, and whether to step, to every rank."""
        batch, self.pending = Lockstep(self.pending, step), []
        dist.broadcast_object_list([batch], src=0, group=self.group)
        self.last_broadcast = time.monotonic()

    def keep_alive(self) -> None:
        """While idle: broadcast at least every heartbeat, so no rank waits in a collective for long."""
        if time.monotonic() - self.last_broadcast >= HEARTBEAT_INTERVAL_S:
            self.broadcast(step=False)


def follow(
    engine: LLMEngine,
    group: dist.ProcessGroup,
    on_step: Callable[[list[RequestOutput], int], None] = lambda outputs, step: None,
) -> None:
    """A non-zero rank's loop: apply rank 0's commands and run its steps until it says Exit. on_step sees each
    step's outputs and number (rank 0 has the same)."""
    steps = 0
    while True:
        received: list[Any] = [None]
        dist.broadcast_object_list(received, src=0, group=group)
        batch: Lockstep = received[0]
        for command in batch.commands:
            if isinstance(command, Exit):
                return
            APPLY[type(command)](engine, command)
        if batch.step:
            steps += 1
            on_step(engine.step(), steps)


def _add(engine: LLMEngine, command: AddRequest) -> None:
    try:
        engine.add_request(command.request_id, command.prompt_token_ids, command.params)
    except Exception:  # noqa: BLE001 - rank 0's engine refused it the same way and reported it
        return


def _abort_all(engine: LLMEngine, _: AbortAll) -> None:
    for request_id in list(engine.requests):
        engine.abort_request(request_id)


def _set_routing(engine: LLMEngine, command: SetRouting) -> None:
    try:
        engine.set_token_routing(command.routing, command.pruning)
    except ValueError:  # rank 0's engine refused it the same way and reported it
        return


APPLY: dict[type, Callable[[LLMEngine, Any], None]] = {
    AddRequest: _add,
    AbortRequest: lambda engine, command: engine.abort_request(command.request_id),
    AbortAll: _abort_all,
    SetRouting: _set_routing,
}
