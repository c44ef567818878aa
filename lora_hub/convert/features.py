"""What a PEFT LoRA config can ask for, and what lora-hub does with each: read it (the format's features), convert it
(base-modifying inits), ignore it (training-only settings), or refuse it with a code of its own that names the
feature, says why, and what to do. No PEFT feature is ever reported as a broken file.

Pure data and config inspection: importing it imports neither torch nor PEFT. findings.py builds its catalogue
entries for the refusals from `REFUSALS`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Refusal:
    """A PEFT feature lora-hub does not carry: its finding code, what it is, why it is refused, and what to do."""

    code: str
    feature: str
    why: str
    fix: str


REFUSALS: dict[str, Refusal] = {
    "alora": Refusal("FEATURE_ALORA", "aLoRA (alora_invocation_tokens)",
                     "it applies its update only to the tokens after its invocation sequence, a per-token switch that "
                     "a plain LoRA update cannot express", "Serve it with PEFT."),
    "qalora": Refusal("FEATURE_QALORA", "QA-LoRA (use_qalora)",
                      "its lora_A reads group-pooled inputs, so its update is not lora_B @ lora_A",
                      "Serve it with PEFT."),
    "layer_replication": Refusal("FEATURE_LAYER_REPLICATION", "layer_replication",
                                 "it rebuilds the model with repeated layers that share base weights; the adapter's "
                                 "module paths belong to that rebuilt model", "Serve it with PEFT."),
    "conv": Refusal("FEATURE_CONV", "LoRA on convolution layers (Conv1d, Conv2d, Conv3d)",
                    "the format holds matrix updates of linear, embedding and expert layers",
                    "Serve it with PEFT, or retrain on linear layers."),
    "mha": Refusal("FEATURE_MHA", "LoRA on nn.MultiheadAttention",
                   "PEFT adapts its fused in_proj and out_proj through a wrapper whose update the format does not "
                   "describe", "Serve it with PEFT."),
    "trained_bias": Refusal("FEATURE_TRAINED_BIAS", "trained base-layer biases (bias='all' or 'lora_only')",
                            "they replace biases of adapted layers, which the format keeps unchanged",
                            "Retrain with bias='none' (or lora_bias=True), or serve it with PEFT."),
    "dora_non_linear": Refusal("FEATURE_DORA_NON_LINEAR", "DoRA on embedding or convolution layers",
                               "the format defines DoRA for linear (and Conv1D) layers", "Serve it with PEFT."),
    "dora_with_bias": Refusal("FEATURE_DORA_WITH_BIAS", "DoRA together with lora_bias",
                              "the format does not define how DoRA's rescaling treats a lora_B bias",
                              "Retrain with one of the two, or serve it with PEFT."),
    "parameter_2d": Refusal("FEATURE_PARAMETER_2D", "target_parameters on a 2-D parameter",
                            "the format's experts kind covers 3-D expert parameters",
                            "Target the module that owns the parameter (target_modules) instead."),
    "mlx_experts": Refusal("FEATURE_MLX_EXPERTS", "mlx-lm LoRA on SwitchLinear expert layers",
                           "their (experts, r, in) factors follow mlx-lm's fused expert layout, which lora-hub does "
                           "not map to the base model's expert parameters", "Run it with mlx-lm."),
    "monteclora": Refusal("FEATURE_MONTECLORA", "MonteCLoRA (monteclora_config)",
                          "it samples its update at run time", "Serve it with PEFT."),
    "bdlora": Refusal("FEATURE_BDLORA", "BD-LoRA (use_bdlora)",
                      "its block-diagonal factors are stored in a layout of their own", "Serve it with PEFT."),
    "arrow": Refusal("FEATURE_ARROW", "Arrow routing (arrow_config)",
                     "it routes each token among several task adapters at run time", "Serve it with PEFT."),
    "kasa": Refusal("FEATURE_KASA", "KaSA (kasa_config)",
                    "it truncates the base weight's singular values and adds a learned diagonal between A and B",
                    "Serve it with PEFT."),
    "megatron": Refusal("FEATURE_MEGATRON", "Megatron tensor-parallel LoRA (megatron_config)",
                        "its factors are sharded across tensor-parallel ranks", "Serve it with PEFT."),
    "init_needs_base": Refusal("FEATURE_INIT_NEEDS_BASE", "a base-modifying initialisation (PiSSA, OLoRA)",
                               "PEFT trained it against a base weight it changed by the initial factors, which must "
                               "be recomputed from the base model to express it as an update",
                               "Give the base model (base=, CLI --base) with its weights, or the initial adapter "
                               "(initial=, --initial)."),
    "init_needs_initial": Refusal("FEATURE_INIT_NEEDS_INITIAL",
                                  "a base-modifying initialisation that cannot be recomputed exactly (PiSSA with "
                                  "randomised SVD, CorDA, LoftQ, LoRA-GA)",
                                  "PEFT trained it against a base weight it changed by initial factors that come from "
                                  "random draws, data or quantisation",
                                  "Give the initial adapter PEFT saved before training (initial=, CLI --initial), as "
                                  "for PEFT's path_initial_model_for_weight_conversion."),
    "unknown": Refusal("FEATURE_UNKNOWN_PEFT", "a PEFT config setting lora-hub does not know",
                       "it may change how the adapter applies", "Serve it with PEFT, or upgrade lora-hub."),
}
"""The refusals, by key. Each code is catalogued (findings.CATALOGUE) and appears in spec/CODES.md."""

BASE_MODIFYING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")
"""init_lora_weights values (pissa also with a _niter_N suffix) whose training changed the base weight."""
RECOMPUTABLE_INITS = ("pissa", "olora")
"""Of those, the ones whose initial factors a full SVD or QR of the base weight gives back exactly."""

_PLAIN_INITS = (True, False, "gaussian", "eva", "orthogonal", "mica")
"""init_lora_weights values that leave the base weight alone (the factors start anew; MiCA freezes lora_B in
training only)."""

_IGNORED = frozenset({
    "task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision", "inference_mode",
    "r", "target_modules", "exclude_modules", "lora_alpha", "lora_dropout", "fan_in_fan_out", "use_rslora",
    "modules_to_save", "init_lora_weights", "layers_to_transform", "layers_pattern", "rank_pattern", "alpha_pattern",
    "megatron_core", "trainable_token_indices", "loftq_config", "eva_config", "corda_config", "lora_ga_config",
    "use_dora", "velora_config", "qalora_group_size", "runtime_config", "lora_bias", "target_parameters",
    "ensure_weight_tying", "enable_lora", "merge_weights", "use_original_dora",
})
"""Keys read for what they are, or that only matter while training (velora_config changes the backward pass only)."""

_SET_MEANS_REFUSAL = {"alora_invocation_tokens": "alora", "use_qalora": "qalora", "layer_replication":
                      "layer_replication", "monteclora_config": "monteclora", "use_bdlora": "bdlora",
                      "arrow_config": "arrow", "kasa_config": "kasa", "megatron_config": "megatron"}


@dataclass(frozen=True)
class Inspection:
    """What a PEFT config asks for: a refusal (the first found), the base-modifying init, if any, and the keys
    lora-hub does not know that it ignores, as PEFT does (they do not look like switches of a LoRA variant)."""

    refusal: tuple[Refusal, str] | None
    init: str | None
    ignored: tuple[str, ...] = ()


def inspect_config(config: Mapping[str, Any]) -> Inspection:
    """Classifies every setting of a PEFT LoRA config (see the module docs)."""
    for key, name in _SET_MEANS_REFUSAL.items():
        if _is_set(config.get(key)):
            return Inspection((REFUSALS[name], f"{key}={_short(config[key])}"), None)
    if config.get("bias", "none") not in (None, "none"):
        return Inspection((REFUSALS["trained_bias"], f"bias={config['bias']!r}"), None)
    if config.get("use_dora") and config.get("lora_bias"):
        return Inspection((REFUSALS["dora_with_bias"], "use_dora=true and lora_bias=true"), None)
    unknown = sorted(k for k in config if k not in _IGNORED and k not in _SET_MEANS_REFUSAL and k != "bias"
                     and _is_set(config[k]))
    switches = [k for k in unknown if _looks_like_a_variant(k)]
    if switches:
        return Inspection((REFUSALS["unknown"], f"{switches[0]}={_short(config[switches[0]])}"), None)
    ignored = tuple(unknown)
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init not in _PLAIN_INITS:
        base = "pissa" if init.startswith("pissa") else init
        if base not in BASE_MODIFYING_INITS:
            return Inspection((REFUSALS["unknown"], f"init_lora_weights={init!r}"), None)
        return Inspection(None, init, ignored)
    if not isinstance(init, (bool, str)):
        return Inspection((REFUSALS["unknown"], f"init_lora_weights={_short(init)}"), None)
    return Inspection(None, None, ignored)


def _looks_like_a_variant(key: str) -> bool:
    """PEFT switches LoRA variants on with `use_<name>` flags, `<name>_config` objects and, for aLoRA, invocation
    tokens: an unknown key of that shape may change how the adapter applies, so it is refused rather than ignored."""
    return key.startswith("use_") or key.endswith(("_config", "_invocation_tokens"))


def recomputable(init: str) -> bool:
    """Whether the initial factors of `init` follow exactly from the base weight (no random draw, no data)."""
    return init in RECOMPUTABLE_INITS


def _is_set(value: Any) -> bool:
    return value not in (None, False, 0, "", [], {}) and not (isinstance(value, dict) and not any(
        _is_set(v) for v in value.values()))


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
