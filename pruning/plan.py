"""A pruning plan: which experts each MoE layer keeps, for one exact model, as a JSON file.

The plan names the model by a SHA-256 of its weight files, so it is never applied to a different checkpoint.
It records the method, the level, the kept experts per layer (original ids), an optional redirect of removed
experts to survivors, and the calibration summary it was made from. The engine runs it through the routing
seam (`routing_policies`).
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from engine.model import MoEForCausalLM
from engine.routing import RoutingPolicy
from pruning.calibration import Calibration
from pruning.selection import select
from pruning.spec import PlanError, PlanSpec

FORMAT_VERSION = 1


def weights_sha256(model_dir: Path) -> str:
    """SHA-256 over the model's safetensors files (names and bytes, in name order), streamed; remembered per
    process while the files' sizes and modification times stay the same."""
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise PlanError(f"{model_dir}: no .safetensors files to identify the model by")
    return _files_sha256(tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files))


@functools.lru_cache(maxsize=32)
def _files_sha256(files: tuple[tuple[str, int, int], ...]) -> str:
    digest = hashlib.sha256()
    for name, _, _ in files:
        file = Path(name)
        digest.update(file.name.encode() + b"\0")
        with file.open("rb") as stream:
            while chunk := stream.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class PruningPlan:
    model_name: str
    model_sha256: str
    method: str
    level: float
    num_experts: int
    top_k: int
    kept: dict[int, list[int]]  # MoE layer -> kept expert ids, ascending
    redirect: dict[int, dict[int, int]] = field(default_factory=dict)  # layer -> {removed expert: survivor}
    budget: str = "uniform"  # or "adaptive": per-layer counts by measured cost
    handling: str = "repick"  # or "redirect": removed experts' slots go to their most similar survivor
    calibration: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for layer, kept in self.kept.items():
            if len(kept) < self.top_k:
                raise PlanError(f"plan keeps {len(kept)} experts in layer {layer}, fewer than top_k={self.top_k}")
            if sorted(set(kept)) != kept or not all(0 <= e < self.num_experts for e in kept):
                raise PlanError(
                    f"plan's kept experts of layer {layer} must be ascending ids in 0..{self.num_experts - 1}"
                )
        for layer, mapping in self.redirect.items():
            survivors = set(self.kept.get(layer, range(self.num_experts)))
            bad = {e: s for e, s in mapping.items() if e in survivors or s not in survivors}
            if bad:
                raise PlanError(f"plan's redirect of layer {layer} must map removed experts to kept ones: {bad}")

    def removed(self) -> dict[int, list[int]]:
        """MoE layer -> the expert ids the plan removes, ascending."""
        return {layer: sorted(set(range(self.num_experts)) - set(kept)) for layer, kept in self.kept.items()}

    def routing_policies(self) -> dict[int, RoutingPolicy]:
        """The engine's routing per MoE layer: removed experts leave the softmax, or their slots are redirected."""
        policies = {}
        for layer, kept in self.kept.items():
            mask = torch.zeros(self.num_experts, dtype=torch.bool)
            mask[kept] = True
            if layer in self.redirect:
                table = torch.arange(self.num_experts)
                for removed, survivor in self.redirect[layer].items():
                    table[removed] = survivor
                policies[layer] = RoutingPolicy(redirect=table)
            else:
                policies[layer] = RoutingPolicy(kept_experts=mask)
        return policies

    def check_model(self, model_dir: Path) -> None:
        """PlanError unless model_dir holds the exact weights this plan was made for."""
        found = weights_sha256(model_dir)
        if found != self.model_sha256:
            raise PlanError(
                f"plan for {self.model_name} (weights {self.model_sha256[:12]}) does not fit {model_dir} "
                f"(weights {found[:12]})"
            )

    def save(self, path: Path) -> None:
        """Write the plan as JSON (atomically: a reader never sees half a file)."""
        body = {"format": FORMAT_VERSION, **asdict(self)}
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(body, indent=2) + "\n")
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> PruningPlan:
        try:
            body = json.loads(path.read_text())
        except FileNotFoundError:
            raise PlanError(f"{path}: plan file does not exist") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise PlanError(f"{path}: not valid JSON ({exc})") from exc
        if not isinstance(body, dict) or body.get("format") != FORMAT_VERSION:
            raise PlanError(f"{path}: not a pruning plan of format {FORMAT_VERSION}")
        try:
            return cls(
                model_name=str(body["model_name"]),
                model_sha256=str(body["model_sha256"]),
                method=str(body["method"]),
                level=float(body["level"]),
                num_experts=int(body["num_experts"]),
                top_k=int(body["top_k"]),
                kept={int(layer): [int(e) for e in kept] for layer, kept in body["kept"].items()},
                redirect={
                    int(layer): {int(e): int(s) for e, s in mapping.items()}
                    for layer, mapping in body.get("redirect", {}).items()
                },
                budget=str(body.get("budget", "uniform")),
                handling=str(body.get("handling", "repick")),
                calibration=dict(body.get("calibration", {})),
            )
        except KeyError as exc:
            raise PlanError(f"{path}: plan field {exc.args[0]!r} is missing") from None
        except (TypeError, ValueError, AttributeError) as exc:
            raise PlanError(f"{path}: malformed plan ({exc})") from exc


def make_plan(model_dir: Path, model: MoEForCausalLM, calibration: Calibration, spec: PlanSpec) -> PruningPlan:
    """The plan `spec` asks for, for the model in model_dir (loaded as `model`), from its calibration."""
    selection = select(calibration, model, spec)
    num_experts = model.config.num_experts
    return PruningPlan(
        model_name=model_dir.resolve().name,
        model_sha256=weights_sha256(model_dir),
        method=spec.method,
        level=spec.level,
        num_experts=num_experts,
        top_k=model.config.top_k,
        kept={
            layer: [e for e in range(num_experts) if e not in set(removed)]
            for layer, removed in selection.removed.items()
        },
        redirect=selection.redirect,
        budget=spec.budget,
        handling=spec.handling,
        calibration={
            "tokens": calibration.layers[0].num_tokens,
            "sampled_tokens": calibration.layers[0].num_sampled,
            "pes": {str(layer.layer): layer.pes for layer in calibration.layers},
            "min_pes": calibration.min_pes,
        },
    )
