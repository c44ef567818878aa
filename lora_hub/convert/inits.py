"""PEFT adapters whose initialisation changed the base weight (PiSSA, OLoRA, CorDA, LoftQ, LoRA-GA), converted to
the exactly equivalent plain adapter.

Such an adapter was trained against `W - s * B0 @ A0`, the base weight minus the update of its initial factors, so
its factors alone do not describe an update to the published base model: run as plain LoRA they give other logits.
PEFT recomputes `B0 @ A0` from the base weight when it loads one (its result is the oracle). The equivalent plain
adapter has rank 2r: lora_A `[A; A0]`, lora_B `[B, -B0]`, alpha doubled (times sqrt(2) with rsLoRA) so the scaling is
unchanged, which is PEFT's own conversion (`path_initial_model_for_weight_conversion`). The initial factors come from
the initial adapter when the caller has it, else from the base weight for the inits a full SVD or QR reproduces
exactly (PiSSA without randomised SVD, OLoRA); the others refuse by name and say what is needed.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from ..adapter import Adapter, ModuleSpec
from ..errors import UnsupportedFeatureError
from .features import REFUSALS, recomputable

if TYPE_CHECKING:
    import torch


def undo_init(adapter: Adapter, init: str, *, weight: Callable[[str], torch.Tensor] | None = None,
              initial: Adapter | None = None) -> Adapter:
    """The plain adapter equivalent to `adapter`, trained from the base-modifying init `init`.

    Args:
        weight: Gives a module's base weight as stored (float), to recompute the initial factors.
        initial: The initial adapter PEFT saved before training (its factors are A0 and B0).

    Raises:
        UnsupportedFeatureError: FEATURE_INIT_NEEDS_BASE (no base weights, for PiSSA or OLoRA) or
            FEATURE_INIT_NEEDS_INITIAL (an init that cannot be recomputed exactly), naming what is needed.
    """
    import torch

    if initial is None and (weight is None or not recomputable(init)):
        refusal = REFUSALS["init_needs_base" if recomputable(init) else "init_needs_initial"]
        raise UnsupportedFeatureError(f"an adapter trained from init_lora_weights={init!r}: {refusal.why}. "
                                      f"{refusal.fix}", code=refusal.code)
    modules: dict[str, ModuleSpec] = {}
    tensors: dict[str, Any] = dict(adapter.tensors)
    for module, spec in adapter.modules.items():
        if spec.kind != "linear" or spec.enable_lora is not None:
            raise UnsupportedFeatureError(f"module '{module}': PEFT initialises {init} only on linear layers",
                                          code=REFUSALS["unknown"].code, module=module)
        if initial is not None:
            a0, b0 = _initial_factors(initial, module, spec)
        else:
            a0, b0 = initial_factors(init, weight(module), spec)
        a, b = adapter.lora_A(module), adapter.lora_B(module)
        a_name, b_name = spec.tensor_names(module)[:2]
        tensors[a_name] = torch.cat([a, a0.to(a.dtype)], dim=0)
        tensors[b_name] = torch.cat([b, -b0.to(b.dtype)], dim=1)
        alpha = spec.alpha * (math.sqrt(2) if spec.rslora else 2)
        modules[module] = replace(spec, r=2 * spec.r, alpha=alpha)
    converted = adapter.derived(replace(adapter.config, modules=modules), tensors)
    converted.peft_init = None
    return converted


def initial_factors(init: str, weight: torch.Tensor, spec: ModuleSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """A0 and B0 as PEFT's pissa_init and olora_init compute them from the base weight (float32)."""
    import torch

    w = weight.to(torch.float32)
    r, scaling = spec.r, spec.scaling
    if init == "pissa":  # on the (out, in) weight; singular values divided by the scaling, split as square roots
        w = w.T if spec.fan_in_fan_out else w
        v, s, uh = torch.linalg.svd(w, full_matrices=False)
        root = torch.sqrt(s[:r] / scaling)
        return torch.diag(root) @ uh[:r], v[:, :r] @ torch.diag(root)
    q, rr = torch.linalg.qr(w)  # olora: on the weight as stored
    return rr[:r].contiguous(), q[:, :r].contiguous()


def _initial_factors(initial: Adapter, module: str, spec: ModuleSpec) -> tuple[torch.Tensor, torch.Tensor]:
    from ..errors import PeftConfigError

    theirs = initial.modules.get(module)
    if theirs is None or (theirs.r, theirs.in_features, theirs.out_features) != (spec.r, spec.in_features,
                                                                                  spec.out_features):
        raise PeftConfigError(f"the initial adapter does not have module '{module}' with r={spec.r}, "
                              f"in={spec.in_features}, out={spec.out_features}: it is not this adapter's initial "
                              "state", module=module)
    return initial.lora_A(module), initial.lora_B(module)


def weight_reader(base: Any) -> Callable[[str], torch.Tensor]:
    """A function giving a module's base weight from `base`: a loaded model or a runtime's live base (their float
    weights), or a model folder or cached Hub id (read from its safetensors files, nothing else)."""
    from torch import nn

    from ..basemodel import LiveBase, read_weights

    if isinstance(base, (nn.Module, LiveBase)):
        def from_model(module: str) -> torch.Tensor:
            layer = base.modules[module] if isinstance(base, LiveBase) else base.get_submodule(module)
            w = layer.weight
            if not w.is_floating_point() or w.element_size() < 2:
                raise UnsupportedFeatureError(
                    f"'{module}' is quantized: the initial factors of a base-modifying init are computed from the "
                    "float weights (as PEFT requires); give the base model in float, or the initial adapter",
                    code=REFUSALS["init_needs_base"].code, module=module)
            return w.detach()
        return from_model

    def from_folder(module: str) -> torch.Tensor:
        return read_weights(base, [f"{module}.weight"])[f"{module}.weight"]
    return from_folder
