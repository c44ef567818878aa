"""Verdicts on every LoRA adapter PEFT writes, and profiles that agree with the runtimes they name.

Every PEFT feature is either read (the verdict is ok, and test_peft_features.py shows the run time matches PeftModel)
or refused with a code of its own: no feature is blamed on the file. `--profile vllm` says what vLLM 0.33's loader
says (its PEFTHelper.validate_legal and LoRAModel.from_local_checkpoint, run here as an oracle when vLLM is installed:
see spec/PROFILES.md), and `--profile peft` what PeftModel does.
"""

from __future__ import annotations

import bisect
import json
import re
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from peft.tuners.lora.config import ArrowConfig, BdLoraConfig, KasaConfig, MontecloraConfig
from safetensors.torch import load_file, save_file
from torch import nn

import lora_hub
from lora_hub.findings import CATALOGUE
from lora_hub.testing import LORA_TARGETS
from lora_hub.validate import VLLM_MAX_LORA_RANKS
from tests.peft_cases import BUILDERS, peft_adapter


class _Conv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 8, 3), nn.Linear(8, 8)


class _Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn, self.fc = nn.MultiheadAttention(16, 2), nn.Linear(16, 16)


CUSTOM = {"conv": _Conv, "mha": _Attention}
Q = dict(target_modules=["q_proj"])

# name: (the model PEFT trains, LoraConfig settings, keys written into adapter_config.json afterwards (as PEFT's own
# config classes serialise them), the error codes of the verdict; set() means the adapter is read)
FEATURES = {
    "plain": ("llama", dict(target_modules=["q_proj", "v_proj"]), {}, set()),
    "patterns_and_rslora": ("llama", dict(
        target_modules=LORA_TARGETS["llama"], layers_to_transform=[1], layers_pattern="layers",
        rank_pattern={r"layers\.1\.self_attn\.(q|k)_proj": 8}, alpha_pattern={"down_proj": 3}, use_rslora=True), {},
        set()),
    "embedding": ("llama", dict(target_modules=["embed_tokens", "q_proj"]), {}, set()),
    "lm_head": ("llama", dict(target_modules=["lm_head", "q_proj"]), {}, set()),
    "lm_head_tied": ("tied", dict(target_modules=["lm_head", "embed_tokens", "q_proj"]), {}, set()),
    "resized_vocabulary": ("resized", dict(target_modules=["embed_tokens", "lm_head", "q_proj"]), {}, set()),
    "lora_bias": ("llama", dict(target_modules=["q_proj", "down_proj"], lora_bias=True), {}, set()),
    "dora": ("llama", dict(target_modules=LORA_TARGETS["llama"], use_dora=True), {}, set()),
    "dora_conv1d": ("gpt2", dict(target_modules=LORA_TARGETS["gpt2"], use_dora=True, fan_in_fan_out=True), {}, set()),
    "trainable_tokens": ("llama", dict(target_modules=["q_proj"], trainable_token_indices=[1, 5, 7]), {}, set()),
    "experts_mixtral": ("mixtral", dict(target_modules=["q_proj"], target_parameters=[
        "mlp.experts.gate_up_proj", "mlp.experts.down_proj"]), {}, set()),
    "experts_qwen3_moe": ("qwen3_moe", dict(target_modules=["q_proj"], target_parameters=[
        "mlp.experts.gate_up_proj", "mlp.experts.down_proj"]), {}, set()),
    "classifier_head": ("llama_classifier", dict(target_modules=["q_proj"], task_type="SEQ_CLS"), {}, set()),
    "modules_to_save": ("llama", dict(target_modules=["q_proj"], modules_to_save=["lm_head"]), {}, set()),
    "init_gaussian": ("llama", dict(Q, init_lora_weights="gaussian"), {}, set()),
    "init_pissa": ("llama", dict(Q, init_lora_weights="pissa"), {}, set()),
    "init_olora": ("llama", dict(Q, init_lora_weights="olora"), {}, set()),
    "init_pissa_niter": ("llama", Q, {"init_lora_weights": "pissa_niter_4"}, {"FEATURE_INIT_NEEDS_INITIAL"}),
    "init_corda": ("llama", Q, {"init_lora_weights": "corda"}, {"FEATURE_INIT_NEEDS_INITIAL"}),
    "init_loftq": ("llama", Q, {"init_lora_weights": "loftq"}, {"FEATURE_INIT_NEEDS_INITIAL"}),
    "init_lora_ga": ("llama", Q, {"init_lora_weights": "lora_ga"}, {"FEATURE_INIT_NEEDS_INITIAL"}),
    "alora": ("llama", Q, {"alora_invocation_tokens": [5, 6]}, {"FEATURE_ALORA"}),
    "qalora": ("llama", Q, {"use_qalora": True, "qalora_group_size": 16}, {"FEATURE_QALORA"}),
    "layer_replication": ("llama", Q, {"layer_replication": [[0, 2], [1, 2]]}, {"FEATURE_LAYER_REPLICATION"}),
    "monteclora": ("llama", Q, {"monteclora_config": asdict(MontecloraConfig())}, {"FEATURE_MONTECLORA"}),
    "bdlora": ("llama", Q, {"use_bdlora": asdict(BdLoraConfig(target_modules_bd_a=["q_proj"]))}, {"FEATURE_BDLORA"}),
    "arrow": ("llama", Q, {"arrow_config": asdict(ArrowConfig())}, {"FEATURE_ARROW"}),
    "kasa": ("llama", Q, {"kasa_config": asdict(KasaConfig())}, {"FEATURE_KASA"}),
    "megatron": ("llama", Q, {"megatron_config": {"tensor_model_parallel_size": 2}}, {"FEATURE_MEGATRON"}),
    "unknown_variant": ("llama", Q, {"use_tomorrows_lora": True}, {"FEATURE_UNKNOWN_PEFT"}),
    "trained_bias": ("llama", dict(target_modules=["q_proj"], bias="lora_only"), {}, {"FEATURE_TRAINED_BIAS"}),
    "dora_with_lora_bias": ("llama", dict(Q, use_dora=True), {"lora_bias": True}, {"FEATURE_DORA_WITH_BIAS"}),
    "dora_embedding": ("llama", dict(target_modules=["embed_tokens"], use_dora=True), {}, {"FEATURE_DORA_NON_LINEAR"}),
    "parameter_2d": ("llama", dict(target_modules=[], target_parameters=["self_attn.q_proj.weight"]), {},
                     {"FEATURE_PARAMETER_2D"}),
    "conv": ("conv", dict(target_modules=["conv", "fc"]), {}, {"FEATURE_CONV"}),
    "mha": ("mha", dict(target_modules=["attn", "fc"]), {}, {"FEATURE_MHA"}),
}


def _model(name: str) -> nn.Module:
    if name in CUSTOM:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return CUSTOM[name]()
    return BUILDERS[name]()


def _write(folder: Path, trained_on: str, settings: dict, edits: dict) -> Path:
    peft_adapter(folder, _model(trained_on), **settings)
    if edits:
        config = folder / "adapter_config.json"
        config.write_text(json.dumps(json.loads(config.read_text()) | edits))
    return folder


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("verdicts")
    return {name: _write(root / name, trained_on, settings, edits)
            for name, (trained_on, settings, edits, _) in FEATURES.items()}


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict[str, Path | nn.Module]:
    """The base each adapter is judged against: the published model (a resized vocabulary's adapter brings its own
    embedding matrices), as a folder; the custom models as live modules."""
    root = tmp_path_factory.mktemp("bases")
    out: dict[str, Path | nn.Module] = {name: _model(name) for name in CUSTOM}
    for name in {"llama", "tied", "gpt2", "mixtral", "qwen3_moe", "llama_classifier"}:
        BUILDERS[name]().save_pretrained(root / name)
        out[name] = root / name
    out["resized"] = out["llama"]
    return out


def _errors(report: lora_hub.ValidationReport) -> set[str]:
    return {f.code for f in report.findings if f.severity.value == "error"}


@pytest.mark.parametrize("name", list(FEATURES))
def test_every_peft_feature_is_read_or_refused_by_its_own_code(name: str, written, bases) -> None:
    trained_on, _, _, expected = FEATURES[name]
    report = lora_hub.validate(written[name], base=bases[trained_on])
    assert _errors(report) == expected, report.findings
    if expected:
        code = next(iter(expected))
        assert CATALOGUE[code].fix and f"`{code}`" in Path("spec/CODES.md").read_text()
        with pytest.raises(lora_hub.UnsupportedFeatureError) as caught:
            lora_hub.convert_adapter(written[name], base=bases[trained_on])
        assert caught.value.code == code


def test_pissa_without_the_base_is_refused_by_name(written) -> None:
    assert _errors(lora_hub.validate(written["init_pissa"])) == {"FEATURE_INIT_NEEDS_BASE"}


# --- --profile vllm --------------------------------------------------------------------------------------------

# name: (the base it is judged against (FEATURES' by default), the error codes of --profile vllm, warnings among them)
VLLM = {
    "plain": (set(), set()),
    "patterns_and_rslora": (set(), set()),
    "embedding": (set(), set()),
    "lm_head": (set(), set()),
    "lm_head_tied": (set(), set()),
    "resized_vocabulary": ({"VLLM_BASE_WEIGHTS_DIFFER"}, set()),
    "lora_bias": ({"VLLM_LORA_BIAS"}, set()),
    "dora": ({"VLLM_DORA"}, set()),
    "trainable_tokens": ({"VLLM_TRAINABLE_TOKENS"}, set()),
    "experts_mixtral": (set(), {"VLLM_EXPERTS"}),
    "experts_qwen3_moe": (set(), {"VLLM_EXPERTS"}),
    "classifier_head": (set(), set()),
    "modules_to_save": ({"VLLM_MODULES_TO_SAVE"}, set()),
    "init_gaussian": (set(), set()),
    "init_pissa": ({"VLLM_INIT"}, set()),
    "init_olora": ({"VLLM_INIT"}, set()),
    "init_lora_ga": ({"FEATURE_INIT_NEEDS_INITIAL"}, set()),
    "alora": ({"FEATURE_ALORA"}, set()),
    "qalora": ({"FEATURE_QALORA"}, set()),
    "layer_replication": ({"FEATURE_LAYER_REPLICATION"}, set()),
    "bdlora": ({"FEATURE_BDLORA"}, set()),
    "trained_bias": ({"FEATURE_TRAINED_BIAS"}, set()),
}
DIVERGENCES = {
    "init_lora_ga": "vLLM and PeftModel load a LoRA-GA adapter as plain LoRA, on a base weight other than the one it "
                    "was trained against (PEFT subtracted the initial update while training); lora-hub asks for the "
                    "initial adapter",
    "embedding_changed": "vLLM skips the embedding matrix the adapter brings and serves the base model's, so its "
                         "result is not PeftModel's",
}


def _vllm_settings(written) -> dict[str, tuple[Path, str, set[str], set[str]]]:
    """name -> (adapter folder, base name, errors, warnings), with the cases that only the profile needs."""
    out = {name: (written[name], FEATURES[name][0], *VLLM[name]) for name in VLLM}
    root = written["plain"].parent
    changed = root / "embedding_changed"
    if not changed.exists():
        _write(changed, "llama", FEATURES["embedding"][1], {})
        tensors = load_file(changed / "adapter_model.safetensors")
        name = next(n for n in tensors if n.endswith("embed_tokens.base_layer.weight"))
        tensors[name] = tensors[name] + 0.5
        save_file(tensors, changed / "adapter_model.safetensors", metadata={"format": "pt"})
    out["embedding_changed"] = (changed, "llama", {"VLLM_BASE_WEIGHTS_DIFFER"}, set())
    for name, r, patterns in (("rank_600", 600, {}), ("rank_in_config_only", 32, {"q_proj": 4, "v_proj": 4})):
        folder = root / name
        if not folder.exists():
            peft_adapter(folder, BUILDERS["llama"](), target_modules=["q_proj", "v_proj"], r=r, rank_pattern=patterns)
        out[name] = (folder, "llama", {"VLLM_RANK"} if r > 512 else set(), set())
    return out


@pytest.fixture(scope="module")
def vllm_cases(written) -> dict[str, tuple[Path, str, set[str], set[str]]]:
    return _vllm_settings(written)


def _needed_rank(report: lora_hub.ValidationReport) -> int:
    finding = next(f for f in report.findings if f.code == "VLLM_MAX_LORA_RANK")
    return int(re.search(r"--max-lora-rank (\d+)", finding.message).group(1))


def test_the_vllm_profile_table(vllm_cases, bases) -> None:
    for name, (folder, base, errors, warnings) in vllm_cases.items():
        report = lora_hub.validate(folder, base=bases[base], profile="vllm")
        assert _errors(report) == errors, (name, report.findings)
        assert warnings <= {f.code for f in report.findings}, (name, report.findings)
        if not errors:
            assert _needed_rank(report) == {"rank_in_config_only": 32, "patterns_and_rslora": 8}.get(name, 8)


def test_without_the_base_vllm_brought_matrices_are_a_warning(written) -> None:
    report = lora_hub.validate(written["embedding"], profile="vllm")
    assert report.ok and "VLLM_BASE_WEIGHTS" in report.codes


def test_a_converted_file_is_judged_as_its_peft_folder(written, bases, tmp_path: Path) -> None:
    for name, expected in (("plain", set()), ("dora", {"VLLM_DORA"}), ("init_pissa", set()),
                           ("trainable_tokens", {"VLLM_TRAINABLE_TOKENS"})):
        base = bases[FEATURES[name][0]]
        file = lora_hub.save_adapter(lora_hub.convert_adapter(written[name], base=base), tmp_path / f"{name}.st")
        assert _errors(lora_hub.validate(file, base=base, profile="vllm")) == expected, name


# --- --profile peft ----------------------------------------------------------------------------------------------

def test_peft_needs_a_resized_base_for_a_resized_vocabulary(written, bases) -> None:
    folder = written["resized_vocabulary"]
    report = lora_hub.validate(folder, base=bases["llama"], profile="peft")
    assert report.ok and "PEFT_RESIZE_EMBEDDINGS" in report.codes
    assert "resize_token_embeddings(130)" in next(f.message for f in report.findings
                                                   if f.code == "PEFT_RESIZE_EMBEDDINGS")
    with pytest.raises(RuntimeError, match="size mismatch"):  # the oracle: PeftModel as the finding says
        PeftModel.from_pretrained(BUILDERS["llama"](), folder)
    model = BUILDERS["llama"]()
    model.resize_token_embeddings(130)
    PeftModel.from_pretrained(model, folder)
    assert "PEFT_RESIZE_EMBEDDINGS" not in lora_hub.validate(folder, base=bases["llama"]).codes


def test_what_peft_config_cannot_express_fails_the_peft_profile(written, bases, tmp_path: Path) -> None:
    adapter = lora_hub.convert_adapter(written["dora"], base=bases["llama"])
    first = next(iter(adapter.modules))
    magnitude = adapter.modules[first].tensor_names(first).magnitude
    modules = dict(adapter.modules) | {first: replace(adapter.modules[first], dora=False)}
    mixed = adapter.derived(replace(adapter.config, modules=modules),
                            {n: t for n, t in adapter.tensors.items() if n != magnitude})
    file = lora_hub.save_adapter(mixed, tmp_path / "mixed.safetensors")
    report = lora_hub.validate(file, profile="peft")
    assert "PEFT_CANNOT_EXPRESS" in _errors(report) and "DoRA on some modules only" in report.findings[-1].message
    with pytest.raises(lora_hub.ConversionError, match="DoRA on some modules only"):
        lora_hub.to_peft(lora_hub.load_adapter(file), tmp_path / "folder")
    assert lora_hub.validate(file, profile="lora-hub").ok  # lora-hub itself carries and runs it


# --- vLLM's own loader as the oracle ---------------------------------------------------------------------------

VLLM_MODULES = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "embed_tokens",
                "lm_head", "experts", "score"}
"""What vLLM's worker expects for these models (its LoRA-capable layers, packed ones unpacked; worker_manager.py)."""


def _vllm_accepts(folder: Path, *, max_lora_rank: int = 512, vocabulary: int = 128) -> bool:
    import vllm.lora.lora_model as lora_model
    from vllm.config.lora import LoRAConfig
    from vllm.lora.peft_helper import PEFTHelper

    lora_model.PIN_MEMORY = False
    try:
        helper = PEFTHelper.from_local_dir(str(folder), max_position_embeddings=128)
        helper.validate_legal(LoRAConfig(max_lora_rank=max_lora_rank))
        lora_model.LoRAModel.from_local_checkpoint(str(folder), VLLM_MODULES, helper, lora_model_id=1, device="cpu",
                                                   model_vocab_size=vocabulary)
    except (ValueError, RuntimeError):
        return False
    return True


@pytest.mark.vllm
def test_the_vllm_profile_agrees_with_vllms_loader(vllm_cases, bases, tmp_path: Path) -> None:
    pytest.importorskip("vllm", reason="vLLM's loader is the oracle: see ../shared/oracles/README.md")
    for name, (folder, base, _, _) in vllm_cases.items():
        report = lora_hub.validate(folder, base=bases[base], profile="vllm")
        accepted = _vllm_accepts(folder)
        if name in DIVERGENCES:
            assert accepted and not report.ok, name
            continue
        assert accepted == report.ok, (name, report.findings)
        if report.ok:
            rank = _needed_rank(report)
            assert _vllm_accepts(folder, max_lora_rank=rank), name
            smaller = VLLM_MAX_LORA_RANKS[bisect.bisect_left(VLLM_MAX_LORA_RANKS, rank) - 1] if rank > 1 else None
            assert smaller is None or not _vllm_accepts(folder, max_lora_rank=smaller), name
        converted = tmp_path / name
        if lora_hub.validate(folder, base=bases[base]).ok:  # the lora-hub file, judged as the folder to_peft writes
            file = lora_hub.save_adapter(lora_hub.convert_adapter(folder, base=bases[base]), tmp_path / f"{name}.st")
            report = lora_hub.validate(file, base=bases[base], profile="vllm")
            try:
                lora_hub.to_peft(lora_hub.load_adapter(file), converted, base=bases[base])
            except lora_hub.ConversionError:
                assert not report.ok, name
                continue
            assert _vllm_accepts(converted) == report.ok, (name, report.findings)
