"""A plan's selection: the experts its method removes from each layer of this model, and where their slots go
when they are redirected."""

from __future__ import annotations

from dataclasses import dataclass

from engine.model import MoEForCausalLM
from pruning.calibration import Calibration
from pruning.methods import METHODS, experts_to_remove
from pruning.redundancy import redirect_targets
from pruning.spec import PlanSpec


@dataclass(frozen=True)
class Selection:
    """What a method removes: per MoE layer the removed experts (removal order) and, when redirecting, where
    each removed expert's slots go."""

    removed: dict[int, list[int]]
    redirect: dict[int, dict[int, int]]


def select(calibration: Calibration, model: MoEForCausalLM, spec: PlanSpec) -> Selection:
    """The experts spec's method removes at its level from the calibrated model (the registered selector, given
    the count per layer the level means for this model), with each removed expert's survivor when redirecting."""
    count = experts_to_remove(model.config.num_experts, model.config.top_k, spec.level)
    removed = METHODS[spec.method].select(calibration, model, count, spec)
    redirect = {}
    if spec.handling == "redirect":
        similarity = {layer.layer: layer.similarity for layer in calibration.layers}
        redirect = {
            layer: redirect_targets(similarity[layer], experts) for layer, experts in removed.items() if experts
        }
    return Selection(removed, redirect)
