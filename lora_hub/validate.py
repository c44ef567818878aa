"""Verdicts on adapter files before anything touches a model.

`validate` reads a source (a lora-hub file, or any layout `convert_adapter` reads) and runs:

    header  structure, limits, metadata, config, tensor index          reads the header only
    full    tensor contents streamed in bounded chunks (NaN/Inf, untrained modules, outliers, checksum)
    base    every module exists in the base model and fits it           config.json on the meta device
    profile whether the file will work where it is headed               peft, vllm, llama.cpp, mlx, lora-hub
                                                                         (spec/PROFILES.md)

Every problem is a `Finding` with a stable code (lora_hub.findings, spec/CODES.md). `validate` does not raise for a
bad file: what stops one tier is a finding, and the other tiers still run where they can.
"""

from __future__ import annotations

import bisect
import math
import os
import statistics
import warnings
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from . import constants as C
from .adapter import BASE_MODEL_KEYS, CONFIG_KEYS, MODULE_KEYS, AdapterConfig
from .basemodel import fingerprint
from .convert.layouts import PEFT_CONFIG, Detected, FileKind, Layout, detect_layout
from .errors import LoraHubError, LoraHubWarning
from .findings import Finding, ValidationReport
from .format import AdapterHeader, SafetensorsHeader, adapter_header, is_canonical, read_header
from .jsontext import strict_loads
from .tensors import RenamedTensors

if TYPE_CHECKING:
    from .adapter import Adapter
    from .basemodel import BaseModelInfo, BaseSource

Level = Literal["header", "full"]
Profile = Literal["peft", "vllm", "llama.cpp", "mlx", "lora-hub"]
LEVELS = ("header", "full")
PROFILES = ("peft", "vllm", "llama.cpp", "mlx", "lora-hub")
OUTLIER_RATIO = 100.0
"""A LoRA factor whose largest value exceeds this multiple of the median over its role (all lora_A, or all lora_B)
is reported as MAGNITUDE_OUTLIER; adapters with fewer than 4 modules have no distribution to compare with."""
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
"""The values vLLM accepts for --max-lora-rank (vllm/config/lora.py, MaxLoRARanks)."""
VLLM_PLAIN_INITS = ("gaussian", "eva", "orthogonal", "mica", "lora_ga")
"""The string values of init_lora_weights that vLLM accepts (vllm/lora/peft_helper.py); true and false too."""
VLLM_HEADS = ("classifier", "score")
"""The modules to save that vLLM loads (a classification model's head)."""
_LISTED = 5
"""Findings about more modules than this are given as one finding with a count."""
_METADATA_KEYS = frozenset({C.METADATA_FORMAT, C.METADATA_FORMAT_VERSION, C.METADATA_CONFIG, C.METADATA_FEATURES})


def validate(source: str | os.PathLike[str], *, base: BaseSource | None = None, level: Level = "full",
             profile: Profile | None = None, allow_pickle: bool = False, **convert_options: Any) -> ValidationReport:
    """Checks an adapter and returns the verdict with every finding.

    Args:
        source: A lora-hub file, or a PEFT folder or file, or a loralib checkpoint.
        base: A base model to check the adapter against (a model folder, a config.json, a Hub id already in the
            local cache, a config or a loaded model); adds the base tier.
        level: "header" reads only the header (its cost does not grow with the file); "full" also streams every
            tensor's contents in bounded chunks.
        profile: Also check that the file will work in "peft" (PeftModel), "vllm", "llama.cpp" or "mlx" (mlx-lm)
            with PeftModel's result, once converted where it needs to be, or that it is a strict "lora-hub" file
            (spec/PROFILES.md).
        allow_pickle: Open pickle checkpoints (weights_only, on the CPU); without it they get PICKLE_REFUSED.
        convert_options: For layouts that need them, such as loralib's alpha (see `convert_adapter`).

    Returns:
        The report: `ok` is true when no finding is an error.

    Raises:
        ValueError: `level` or `profile` is not one of the valid choices (a usage error; a bad file never raises).

    Example:
        >>> report = lora_hub.validate("third_party.safetensors", base="./llama", profile="vllm")
        >>> report.ok, [f.code for f in report.findings]
        (True, ['CHECKSUM_VERIFIED', 'VLLM_MAX_LORA_RANK'])
    """
    if level not in LEVELS:
        raise ValueError(f"level must be one of {', '.join(LEVELS)}, got {level!r}")
    if profile is not None and profile not in PROFILES:
        raise ValueError(f"profile must be one of {', '.join(PROFILES)} or None, got {profile!r}")
    report = ValidationReport(os.fspath(source), level, profile)
    run = _Validation(report, Path(source))
    if base is not None:
        convert_options = {"reference_base": base, **convert_options}
    if run.guard(lambda: run.read(allow_pickle, convert_options)):
        if level == "full":
            run.guard(run.full_tier)
        if base is not None:
            run.guard(lambda: run.base_tier(base))
        if profile is not None:
            run.guard(lambda: getattr(run, f"profile_{profile.replace('-', '_').replace('.', '_')}")())
    return report


class _Findings:
    """Collects findings: one per problem, or one with a count when many modules have the same problem."""

    def __init__(self, findings: list[Finding]) -> None:
        self.findings = findings
        self.file: str | None = None

    def add(self, code: str, message: str, *, tensor: str | None = None, module: str | None = None) -> None:
        self.findings.append(Finding.of(code, message, file=self.file, tensor=tensor, module=module))

    def add_each(self, code: str, modules: list[str], describe: Callable[[str], str]) -> None:
        if len(modules) <= _LISTED:
            for module in modules:
                self.add(code, describe(module), module=module)
        elif modules:
            self.add(code, f"{len(modules)} modules: {describe(modules[0])} (and {len(modules) - 1} more)",
                     module=modules[0])


def check_base(config: AdapterConfig, info: BaseModelInfo, tensor_shapes: Mapping[str, tuple[int, ...]], *,
               from_lora_hub: bool = True) -> list[Finding]:
    """The base tier: does an adapter (its config and tensor shapes) fit a base model? Used by `validate` and by
    the runtime before it loads anything.

    Args:
        from_lora_hub: The config comes from a lora-hub file (a wrong fan_in_fan_out is then an error in the file;
            for other layouts it is a config quirk that PEFT corrects, a warning).
    """
    from .basemodel import layer_mismatch, tokens_mismatch
    from .convert.features import REFUSALS

    out = _Findings([])
    for m in config.modules:
        if m in info.unsupported:
            refusal = REFUSALS[info.unsupported[m]]
            out.add(refusal.code, f"'{m}' is {refusal.feature}, which lora-hub does not carry", module=m)
    candidates = [m for m in config.modules if m not in info.unsupported]
    present = [m for m in candidates if m in info.layers]
    missing = [m for m in candidates if m not in info.layers]
    if candidates and not present:
        out.add("NO_MODULE_MATCHES", f"none of the {len(missing)} modules is an adaptable layer of the base model "
                                     f"(first: '{missing[0]}'){_prefix_hint(missing, info.layers)}")
    else:
        out.add_each("MODULE_NOT_IN_BASE", missing, lambda m: f"'{m}' is not an adaptable layer of the base model")
    fits = []
    for m in present:
        spec, layer = config.modules[m], info.layers[m]
        problem = layer_mismatch(spec, layer)
        if problem:
            out.add("FEATURES_MISMATCH", problem, module=m)
        else:
            fits.append(m)
        if spec.enable_lora is not None and layer.out_features % len(spec.enable_lora):
            out.add("ENABLE_LORA_MISMATCH", f"{len(spec.enable_lora)} slices do not divide {layer.out_features} "
                                            "output features", module=m)
    for m, indices in config.trainable_tokens.items():
        problem = tokens_mismatch(m, indices, info)
        if problem:
            out.add("TOKENS_MISMATCH", problem, module=m)
        elif m in info.layers and tensor_shapes.get(config.token_tensor_name(m), (0, 0))[-1] != \
                info.layers[m].out_features:
            out.add("TOKENS_MISMATCH", f"the rows have width {tensor_shapes[config.token_tensor_name(m)][-1]}, the "
                                       f"embedding {info.layers[m].out_features}", module=m)
    flipped = [m for m in present if config.modules[m].kind != "embedding"
               and config.modules[m].fan_in_fan_out != info.layers[m].fan_in_fan_out]
    out.add_each("FAN_IN_FAN_OUT_MISMATCH" if from_lora_hub else "FAN_IN_FAN_OUT_IN_CONFIG", flipped, lambda m: (
        f"fan_in_fan_out is {str(config.modules[m].fan_in_fan_out).lower()} but '{m}' is "
        f"{'a Conv1D' if info.layers[m].fan_in_fan_out else 'an nn.Linear'}"))
    _check_replacements(out, config, info, tensor_shapes)
    same_shape = [m for m in fits if info.layers[m].weight_shape == config.modules[m].delta_shape]
    _check_declared_base(out, config, info, same_shape if len(same_shape) == len(config.modules) else None)
    kinds = sorted({info.layers[m].quantization for m in present if info.layers[m].quantization})
    if kinds:
        out.add("QUANTIZED_BASE", f"targeted layers are {', '.join(kinds)}")
    return out.findings


def _check_replacements(out: _Findings, config: AdapterConfig, info: BaseModelInfo,
                        shapes: Mapping[str, tuple[int, ...]]) -> None:
    if not config.modules_to_save:
        return  # no tensor can be a replacement
    for module in config.modules_to_save:
        if module not in info.modules:
            out.add("REPLACEMENT_NOT_IN_BASE", f"module to save '{module}' is not in the base model", module=module)
    for name in shapes:
        owner = config.replacement_owner(name)
        if owner is None or owner not in info.modules:
            continue
        path = name[len(C.TENSOR_PREFIX):]
        if path not in info.parameters:
            out.add("REPLACEMENT_NOT_IN_BASE", f"the base model has no parameter '{path}'", tensor=name)
        elif tuple(info.parameters[path]) != tuple(shapes[name]):
            out.add("REPLACEMENT_SHAPE_MISMATCH", f"shape {list(shapes[name])}, but the base parameter is "
                                                  f"{list(info.parameters[path])}", tensor=name)


def _check_declared_base(out: _Findings, config: AdapterConfig, info: BaseModelInfo,
                         fitting: list[str] | None) -> None:
    ref = config.base_model
    if ref is None:
        return
    if ref.name and info.name and _short_name(ref.name) != _short_name(info.name):
        out.add("BASE_NAME_DIFFERS", f"the adapter declares '{ref.name}', the base given is '{info.name}'")
    if ref.model_type and info.model_type and ref.model_type != info.model_type:
        out.add("BASE_TYPE_DIFFERS", f"the adapter declares model_type '{ref.model_type}', the base is "
                                     f"'{info.model_type}'")
    if ref.fingerprint and fitting is not None:
        theirs = info.fingerprint(fitting)
        if theirs != ref.fingerprint:
            out.add("FINGERPRINT_MISMATCH", f"stored {ref.fingerprint}, the base gives {theirs}")


class _Validation(_Findings):
    """The state of one validation: what was read, and the report being filled."""

    def __init__(self, report: ValidationReport, source: Path) -> None:
        super().__init__(report.findings)
        self.report = report
        self.source = source
        self.detected: Detected | None = None
        self.header: SafetensorsHeader | None = None
        self.config: AdapterConfig | None = None
        self.tensors: Mapping | None = None  # in-memory tensors, for layouts that are not safetensors
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.adapter_header: AdapterHeader | None = None
        self.converted: Adapter | None = None  # what convert_adapter read, for layouts other than lora-hub
        self.base_source: BaseSource | None = None
        self.base_info: BaseModelInfo | None = None

    def adapter(self) -> Adapter:
        """The adapter with its tensors (read on access)."""
        if self.converted is None:
            from .format import load_adapter

            self.converted = load_adapter(self.adapter_header)
        return self.converted

    def guard(self, step: Callable[[], Any]) -> bool:
        """Runs one tier; what stops it becomes a finding. Returns whether it completed."""
        try:
            step()
            return True
        except LoraHubError as e:
            self.report.findings.append(Finding.of(e.code, e.message, file=e.path or self.file, tensor=e.tensor,
                                                   module=e.module))
        except OSError as e:
            self.add("READ_FAILED", f"{type(e).__name__}: {e}")
        except Exception as e:  # a bug, not a verdict on the file: say so rather than crash the caller
            self.add("INTERNAL_ERROR", f"{type(e).__name__}: {e}")
        return False

    # --- header tier -------------------------------------------------------------------------------------------

    def read(self, allow_pickle: bool, convert_options: dict[str, Any]) -> None:
        if not self.source.exists():  # a registry name or a Hub id: pulled with its verdict kept, even invalid
            from .hub import resolve

            found = resolve(self.report.source, force=True)
            self.source = found.path
            self.report.resolved = f"{'registry entry' if found.how == 'registry' else 'pulled'}: {found.path}"
        if self.report.profile == "lora-hub" and self.source.is_file():  # strict: the format reader decides
            detected = self.detected = Detected(Layout.LORA_HUB, self.source, None, FileKind.SAFETENSORS)
        else:
            detected = self.detected = detect_layout(self.source)
        self.file = os.fspath(detected.weights)
        self.report.layout = detected.description
        self.report.tiers.append("header")
        if detected.layout is Layout.LORA_HUB:
            header = self.adapter_header = (adapter_header(detected.header) if detected.header is not None
                                            else read_header(detected.weights))
            self.header, self.config = header.safetensors, header.config
            self.shapes = header.tensors.shapes_by_name()
            if self.config.tensors_sha256 is None:
                self.add("CHECKSUM_ABSENT", "the file records no tensors_sha256")
            ref = self.config.base_model
            if ref is not None and ref.fingerprint is not None:
                own = fingerprint(self.config.delta_shapes())
                if own != ref.fingerprint:
                    self.add("FINGERPRINT_INCONSISTENT", f"stored {ref.fingerprint}, but the module entries give "
                                                         f"{own}")
            config_path = detected.weights.parent / PEFT_CONFIG
            if detected.weights.name == "adapter_model.safetensors" and config_path.is_file():
                self.check_peft_pair(config_path)
        else:
            from .convert import convert_adapter

            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", LoraHubWarning)
                adapter = convert_adapter(self.source, allow_pickle=allow_pickle, **convert_options)
            for warning in caught:
                if issubclass(warning.category, LoraHubWarning):
                    self.add(warning.category.code, str(warning.message))
            self.config, self.converted = adapter.config, adapter
            self.shapes = adapter.tensor_shapes()
            if detected.header is not None and detected.layout is not Layout.MLX:  # MLX's tensors are transposed
                self.header = detected.header
            else:
                self.tensors = adapter.tensors
        if self.config.base_model is None or not self.config.base_model.name:
            self.add("BASE_UNDECLARED", "no base model is declared")

    def check_peft_pair(self, config_path: Path) -> None:
        """A lora-hub file with PEFT's adapter_config.json beside it is also a PEFT folder: PeftModel reads the
        ranks, scalings, targets and saved modules from that config, so it must describe the file (a folder whose
        two files come from different writes would load with the wrong scaling)."""
        from .convert.layouts import read_peft_config
        from .convert.peft import peft_state_to_adapter

        try:
            peft = read_peft_config(config_path)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", LoraHubWarning)
                derived = peft_state_to_adapter(peft, _HeaderTensors(self.header.tensors)).config
        except LoraHubError as e:
            self.add("PEFT_CONFIG_DIFFERS", f"{PEFT_CONFIG} beside the file cannot describe it: {e.message}")
            return
        ignored = [str(w.message) for w in caught if issubclass(w.category, LoraHubWarning)]
        problems = [f"PeftModel would ignore modules: {ignored[0]}"] if ignored else []
        for module, spec in self.config.modules.items():
            theirs = derived.modules.get(module)
            if theirs is None or spec.enable_lora is not None:
                continue
            if theirs.r != spec.r or not math.isclose(theirs.scaling, spec.scaling, rel_tol=1e-9):
                problems.append(f"'{module}' has r={spec.r}, scaling {spec.scaling:g} in the file, but "
                                f"{PEFT_CONFIG} gives r={theirs.r}, scaling {theirs.scaling:g}")
        if set(derived.modules_to_save) != set(self.config.modules_to_save):
            problems.append(f"modules_to_save differ ({', '.join(derived.modules_to_save) or 'none'} in "
                            f"{PEFT_CONFIG}, {', '.join(self.config.modules_to_save) or 'none'} in the file)")
        if problems:
            self.add("PEFT_CONFIG_DIFFERS", f"{PEFT_CONFIG} does not describe the file beside it "
                                            f"({len(problems)} difference(s); first: {problems[0]})")

    # --- full tier ---------------------------------------------------------------------------------------------

    def full_tier(self) -> None:
        from .scan import scan_file, scan_tensors

        self.report.tiers.append("full")
        config = self.config
        expected_sha = config.tensors_sha256 if self.detected.layout is Layout.LORA_HUB else None
        if self.header is not None:
            result = scan_file(self.header, checksum=expected_sha is not None)
        else:
            result = scan_tensors(self.tensors)
        stats = result.stats
        if self.converted is not None and isinstance(self.converted.tensors, RenamedTensors):
            stats = {name: stats[self.converted.tensors.original(name)] for name in self.converted.tensors}
        for name, s in stats.items():
            if s.nonfinite:
                self.add("NON_FINITE", f"{s.nonfinite:,} of {s.numel:,} values are NaN or Inf", tensor=name)
        lora = {m: config.lora_tensor_names(m) for m in config.modules}
        zero = [m for m, names in lora.items() if any(stats[n].all_zero for n in names)]
        if zero and len(zero) == len(lora):
            self.add("UNTRAINED", f"lora_A or lora_B is all zero in all {len(zero)} modules")
        else:
            self.add_each("ZERO_UPDATE", zero, lambda m: f"'{m}' has an all-zero lora_A or lora_B")
        dtypes = sorted({stats[n].dtype for names in lora.values() for n in names})
        if len(dtypes) > 1:
            self.add("DTYPE_MIX", f"LoRA factors are stored as {', '.join(dtypes)}")
        for role, index in (("lora_A", 0), ("lora_B", 1)):
            peaks = {m: stats[names[index]].absmax for m, names in lora.items()}
            if len(peaks) >= 4 and (median := statistics.median(peaks.values())) > 0:
                high = [m for m, peak in peaks.items() if peak > OUTLIER_RATIO * median]
                self.add_each("MAGNITUDE_OUTLIER", high, lambda m, role=role, median=median, peaks=peaks: (
                    f"{role} of '{m}' reaches {peaks[m]:.3g}, {peaks[m] / median:,.0f} times the median {median:.3g}"))
        if expected_sha is not None:
            if result.sha256 == expected_sha:
                self.add("CHECKSUM_VERIFIED", f"sha256 {expected_sha}")
            else:
                self.add("CHECKSUM_MISMATCH", f"the tensors hash to {result.sha256}, the file records {expected_sha}")

    # --- base tier ---------------------------------------------------------------------------------------------

    def base_tier(self, base: BaseSource) -> None:
        from .basemodel import describe_base

        self.report.tiers.append("base")
        info = self.base_info = describe_base(base, task_type=self.config.task_type)
        self.base_source = base
        for finding in check_base(self.config, info, self.shapes,
                                  from_lora_hub=self.detected.layout is Layout.LORA_HUB):
            self.report.findings.append(replace(finding, file=self.file))

    # --- profiles ----------------------------------------------------------------------------------------------

    def profile_peft(self) -> None:
        config = self.config
        merged = [m for m, s in config.modules.items() if s.enable_lora is not None]
        self.add_each("PEFT_ENABLE_LORA", merged, lambda m: f"'{m}' uses enable_lora")
        if self.detected.layout is Layout.LORA_HUB:
            from .convert.peft_export import peft_config
            from .errors import ConversionError

            if not (self.detected.weights.parent / PEFT_CONFIG).is_file():
                self.add("PEFT_CONFIG_ABSENT", f"no {PEFT_CONFIG} beside the file")
            plain = {m: s for m, s in config.modules.items() if s.enable_lora is None}
            try:
                peft_config(replace(config, modules=plain))
            except ConversionError as e:
                self.add("PEFT_CANNOT_EXPRESS", e.message)
        for module, (theirs, ours) in self.resized_vocabularies().items():
            self.add("PEFT_RESIZE_EMBEDDINGS", f"'{module}' brings a vocabulary of {ours} rows, the base has "
                                               f"{theirs}: call resize_token_embeddings({ours}) on the base model "
                                               f"before PeftModel.from_pretrained", module=module)

    def profile_vllm(self) -> None:
        """What vLLM 0.33's loader does with the PEFT folder this is (or that `to_peft` writes from it):
        PEFTHelper.validate_legal, then LoRAModel.from_local_checkpoint (spec/PROFILES.md)."""
        config = self.config
        self.vllm_modules_to_save()
        for code, flag, what in (("VLLM_DORA", "dora", "DoRA"), ("VLLM_LORA_BIAS", "bias", "lora_bias")):
            found = [m for m, s in config.modules.items() if getattr(s, flag)]
            self.add_each(code, found, lambda m, what=what: f"'{m}' uses {what}")
        for module in config.trainable_tokens:
            self.add("VLLM_TRAINABLE_TOKENS", f"'{module}' has trainable tokens", module=module)
        peft = self.detected.peft_config if self.detected.layout is Layout.PEFT else None
        init = peft.get("init_lora_weights") if peft else None
        if isinstance(init, str) and init.lower() not in VLLM_PLAIN_INITS:
            self.add("VLLM_INIT", f"the folder declares init_lora_weights={init!r}, which vLLM refuses; lora-hub read "
                                  "it as the equivalent plain adapter, which a converted folder carries")
        experts = [m for m, s in config.modules.items() if s.kind == "experts"]
        if experts:
            self.add("VLLM_EXPERTS", f"{len(experts)} expert parameters (first: '{experts[0]}')", module=experts[0])
        self.vllm_base_weights()
        merged = [m for m, s in config.modules.items() if s.enable_lora is not None]
        self.add_each("VLLM_ENABLE_LORA", merged, lambda m: f"'{m}' uses enable_lora")
        if peft is not None:  # vLLM reads the ranks the config declares, not the tensors'
            patterns = peft.get("rank_pattern") or {}
            rank = max([peft["r"], *patterns.values()])
        else:
            rank = max(s.r * s.groups for s in config.modules.values())
        if rank > VLLM_MAX_LORA_RANKS[-1]:
            self.add("VLLM_RANK", f"the largest rank is {rank}")
        else:
            needed = VLLM_MAX_LORA_RANKS[bisect.bisect_left(VLLM_MAX_LORA_RANKS, rank)]
            self.add("VLLM_MAX_LORA_RANK", f"the largest rank is {rank}: serve with --max-lora-rank {needed} or more")

    def vllm_modules_to_save(self) -> None:
        """vLLM loads one replaced module, a classification head named classifier or score, stored as
        `<head>.weight` (and `.bias`)."""
        config = self.config
        saved = {config.replacement_owner(n) for n in self.shapes} - {None}
        heads = sorted(m for m in saved if m.rsplit(".", 1)[-1] in VLLM_HEADS)
        others = [m for m in config.modules_to_save if m.rsplit(".", 1)[-1] not in VLLM_HEADS]
        if others:
            self.add("VLLM_MODULES_TO_SAVE", f"modules_to_save: {', '.join(others)}", module=others[0])
        elif len(heads) > 1:
            self.add("VLLM_MODULES_TO_SAVE", f"{len(heads)} classification heads ({', '.join(heads)}): vLLM loads one",
                     module=heads[1])
        else:
            nested = [n for n in self.shapes if config.replacement_owner(n) in heads
                      and n.rsplit(".", 2)[-2] not in VLLM_HEADS]
            if nested:
                self.add("VLLM_MODULES_TO_SAVE", "the classification head has parameters below it, which vLLM does "
                                                 "not read", tensor=nested[0])

    def vllm_base_weights(self) -> None:
        """vLLM skips the embedding matrices an adapter brings (`*.embed_tokens.base_layer.weight`,
        `*.lm_head.base_layer.weight`) and serves the base model's own: the result is PeftModel's only when they
        are the base model's."""
        brought = [m for m, s in self.config.modules.items() if s.replaces_base]
        if not brought:
            return
        resized = self.resized_vocabularies()
        for module, (theirs, ours) in resized.items():
            self.add("VLLM_BASE_WEIGHTS_DIFFER", f"'{module}' brings a vocabulary of {ours} rows, the base has "
                                                 f"{theirs}", module=module)
        unchecked = []
        for module in brought:
            if module in resized:
                continue
            same = self.same_as_base(module)
            if same is None:
                unchecked.append(module)
            elif not same:
                self.add("VLLM_BASE_WEIGHTS_DIFFER", f"'{module}' brings a weight that differs from the base "
                                                     "model's", module=module)
        if unchecked:
            self.add("VLLM_BASE_WEIGHTS", f"{', '.join(unchecked)}: vLLM serves the base model's own weights; give "
                                          "--base with its weights to check that they are the same",
                     module=unchecked[0])

    def resized_vocabularies(self) -> dict[str, tuple[int, int]]:
        """Modules whose brought base weight has another vocabulary size than the base (base tier only):
        module -> (the base's rows, the adapter's rows)."""
        if self.base_info is None:
            return {}
        out = {}
        for module, spec in self.config.modules.items():
            layer = self.base_info.layers.get(module)
            if not spec.replaces_base or layer is None or layer.kind not in ("embedding", "linear"):
                continue
            index = 0 if spec.kind == "embedding" else 1  # vocabulary: in of an embedding, out of a projection
            ours = (spec.in_features, spec.out_features)[index]
            theirs = (layer.in_features, layer.out_features)[index]
            if ours != theirs:
                out[module] = (theirs, ours)
        return out

    def same_as_base(self, module: str) -> bool | None:
        """Whether the base weight the adapter brings for `module` equals the base model's, or None when the base
        given has no weights to compare with."""
        from .basemodel import same_base_weight

        if self.base_source is None:
            return None
        return same_base_weight(self.adapter(), module, self.base_source, self.base_info)

    def profile_llama_cpp(self) -> None:
        """What to_gguf refuses, and so what llama.cpp would not run with PeftModel's result (spec/PROFILES.md)."""
        from .convert.runtimes import llama_cpp_problems

        self.runtime_profile(llama_cpp_problems)

    def profile_mlx(self) -> None:
        """What to_mlx refuses, and so what mlx-lm would not run with PeftModel's result (spec/PROFILES.md)."""
        from .convert.runtimes import mlx_problems

        self.runtime_profile(mlx_problems)

    def runtime_profile(self, problems: Callable[..., list]) -> None:
        """The problems the runtime's writer checks, for this adapter (enable_lora modules in their exact plain form)
        against the base given, else the base model it declares when that can be described."""
        from .basemodel import describe_base, same_base_weight
        from .errors import BaseModelError

        info, source = self.base_info, self.base_source
        declared = self.config.base_model.name if self.config.base_model else None
        if info is None and declared:
            try:
                info, source = describe_base(declared, task_type=self.config.task_type), declared
            except BaseModelError:
                info = None
        from .convert.peft_export import plain_spec

        config = replace(self.config, modules={m: plain_spec(s) for m, s in self.config.modules.items()})

        def same(module: str) -> bool | None:
            return same_base_weight(self.adapter(), module, source, info) if source is not None else None

        for problem in problems(config, info, same):
            self.add(problem.code, problem.message, module=problem.module)

    def profile_lora_hub(self) -> None:
        if self.detected.layout is not Layout.LORA_HUB:
            self.add("NOT_LORA_HUB", f"a {self.detected.layout.value} adapter, not a lora-hub file")
            return
        config, metadata = self.config, self.header.metadata
        if not is_canonical(self.adapter_header):
            self.add("LORA_HUB_NOT_CANONICAL", "the bytes differ from what the canonical writer produces")
        unknown = sorted(k for k in metadata if k not in _METADATA_KEYS and k.startswith("lora_hub."))
        document = strict_loads(metadata[C.METADATA_CONFIG])
        unknown += sorted(f"config.{k}" for k in document if k not in CONFIG_KEYS)
        unknown += sorted(f"config.base_model.{k}" for k in (document.get("base_model") or {})
                          if k not in BASE_MODEL_KEYS)
        unknown += sorted({f"modules.*.{k}" for entry in document["modules"].values() for k in entry
                           if k not in MODULE_KEYS})
        if unknown:
            self.add("LORA_HUB_UNKNOWN_KEY", f"keys the format does not define: {', '.join(unknown[:8])}")
        if config.tensors_sha256 is None:
            self.add("LORA_HUB_CHECKSUM_ABSENT", "no tensors_sha256")
        if config.base_model is None or not config.base_model.name or not config.base_model.fingerprint:
            self.add("LORA_HUB_BASE_UNDECLARED", "base_model.name and base_model.fingerprint are both required")


class _HeaderTensors(Mapping):
    """A file's tensors as its header describes them (names, dtypes, shapes), for readers that need nothing more."""

    def __init__(self, layout: Mapping[str, Any]) -> None:
        self.layout = layout
        self.shapes = {name: info.shape for name, info in layout.items()}

    def __getitem__(self, name: str):
        raise KeyError(f"{name}: only the header is read here")

    def __iter__(self):
        return iter(self.layout)

    def __len__(self) -> int:
        return len(self.layout)


def _short_name(name: str) -> str:
    """'meta-llama/Llama-3.2-1B', '/models/Llama-3.2-1B/' and 'Llama-3.2-1B' compare equal."""
    return name.rstrip("/").rsplit("/", 1)[-1].lower()


def _prefix_hint(modules: list[str], layers: Mapping[str, Any]) -> str:
    """A suggestion when the module paths are right but for a prefix (PEFT keys saved from another wrapper)."""
    first = modules[0]
    for layer in layers:
        if layer.endswith("." + first):
            prefix = layer[: -len(first)]
            hits = sum(prefix + m in layers for m in modules)
            return f"; adding the prefix '{prefix}' would match {hits} of {len(modules)} modules"
    parts = first.split(".")
    for cut in range(1, len(parts)):
        if ".".join(parts[cut:]) in layers:
            prefix = ".".join(parts[:cut]) + "."
            hits = sum(m.startswith(prefix) and m[len(prefix):] in layers for m in modules)
            return f"; removing the prefix '{prefix}' would match {hits} of {len(modules)} modules"
    example = next(iter(layers), None)
    return f"; the base has layers such as '{example}'" if example else ""
