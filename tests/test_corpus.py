"""Every file under ../shared/corpus, written by other people's tools, either converts and inspects or is refused
with a specific error code: the table below records which, and a new corpus file without an entry fails the test."""

from __future__ import annotations

import fnmatch
import json
from dataclasses import dataclass, field
from pathlib import Path

import loralib
import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

import lora_hub


@dataclass(frozen=True)
class Converts:
    modules: int
    ranks: tuple[int, ...]
    to_save: tuple[str, ...] = ()
    pickle: bool = False
    options: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Refused:
    code: str
    pickle: bool = False  # refused only after the pickle opt-in; without it, PICKLE_REFUSED
    options: dict = field(default_factory=dict)


EXPECTED: dict[str, Converts | Refused] = {
    "peft/gpt2-tigrinya": Converts(36, (8,)),
    "peft/anirudh-peft-gpt2": Converts(12, (8,), ("score",)),
    "peft/thesotti-gpt2-bin": Converts(24, (8,), ("score",), pickle=True),
    "peft/yoonyerin-begreat-bin": Converts(12, (8,), pickle=True),
    "peft/gradience-tiny-dialogpt": Converts(12, (8,)),
    "peft/tashu014-distilbert-imdb": Converts(12, (8,), ("classifier", "pre_classifier")),
    "peft/dayanidhi04-distilbert-emotion": Converts(12, (8,), ("classifier", "pre_classifier")),
    "peft/sidkris-bin": Converts(18, (16,), ("classifier", "pre_classifier"), pickle=True),
    "peft/kuntya-udacity": Refused("MODULE_CONFLICT"),
    "peft/hareshjethani-multitask": Converts(24, (8,), ("classifier",)),
    "peft/diaoenmao-t5small-bin": Converts(36, (16,), pickle=True),
    "peft/guilhermmeabreu-lab08": Converts(24, (16,)),
    "peft/chatchat-bin": Refused("FEATURE_UNSUPPORTED"),
    "loralib/microsoft-LoRA/roberta_base_lora_mnli.bin": Converts(
        24, (8,), ("classifier.dense", "classifier.out_proj"), pickle=True, options={"alpha": 16}),
    "loralib/microsoft-LoRA/roberta_base_lora_mnli.bin#no-alpha": Refused("PARAMETER_REQUIRED", pickle=True),
    "diffusers/*": Refused("LAYOUT_UNSUPPORTED"),
    "mlx/*": Refused("LAYOUT_UNSUPPORTED"),
    "gguf/*": Refused("LLAMA_CPP_ARCH"),  # GPT-2, whose llama.cpp layout lora-hub does not map
    "odd/hirvita6-2byte": Refused("FILE_TRUNCATED"),
    "odd/depi-sd-fake": Refused("LAYOUT_UNSUPPORTED"),
    "odd/flux-aitoolkit-mislabelled-sd15": Refused("LAYOUT_UNSUPPORTED"),
    "odd/finsenti-lfs-pointer": Refused("GIT_LFS_POINTER"),
    "odd/esm2-lfs-bin-pointer": Refused("GIT_LFS_POINTER"),
    "odd/lora-vit": Refused("LAYOUT_UNKNOWN"),
    "odd/sam-lora-rank2": Refused("LAYOUT_UNKNOWN"),
    "odd/peft-legacy-mergedlinear-bloom": Converts(24, (8,), pickle=True),
    "odd/gradience-minimal-config": Refused("WEIGHTS_MISSING"),
    "odd/gradience-per-layer-config": Refused("WEIGHTS_MISSING"),
    "odd/kohya-malformed-double-prefix": Refused("LAYOUT_UNSUPPORTED"),
    "base_models/*": Refused("LAYOUT_UNKNOWN"),
    "meta/*": Refused("LAYOUT_UNKNOWN"),
    "MANIFEST.md": Refused("LAYOUT_UNKNOWN"),
}


def _entry_for(relative: str) -> str:
    """The table entry that covers a corpus file: itself, the folder it is in, or a glob. Keys with '#' are extra
    cases of the same path with other options."""
    for key in (k for k in EXPECTED if "#" not in k):
        if relative == key or relative.startswith(key + "/") or fnmatch.fnmatch(relative, key):
            return key
    raise AssertionError(f"corpus file {relative} has no entry in the expected-outcome table")


def _cases(corpus: Path) -> list[tuple[Path, str]]:
    files = [p for p in sorted(corpus.rglob("*")) if p.is_file()]
    folders = sorted({p.parent for p in files if p.parent != corpus and p.parent.parent.name in ("peft", "odd")})
    extra = [(corpus / key.split("#")[0], key) for key in EXPECTED if "#" in key]
    return [(p, _entry_for(str(p.relative_to(corpus)))) for p in folders + files] + extra


def _convert(path: Path, expected: Converts | Refused, *, allow_pickle: bool) -> lora_hub.Adapter:
    return lora_hub.convert_adapter(path, allow_pickle=allow_pickle, **expected.options)


def test_every_corpus_file_has_an_outcome_and_gets_it(corpus: Path) -> None:
    seen = set()
    for path, key in _cases(corpus):
        seen.add(key.split("#")[0])
        expected = EXPECTED[key]
        if expected.pickle:
            with pytest.raises(lora_hub.PickleRefusedError):
                _convert(path, expected, allow_pickle=False)
        if isinstance(expected, Refused):
            with pytest.raises(lora_hub.LoraHubError) as raised:
                _convert(path, expected, allow_pickle=expected.pickle)
            assert raised.value.code == expected.code, f"{path}: {raised.value}"
            continue
        adapter = _convert(path, expected, allow_pickle=expected.pickle)
        assert len(adapter.modules) == expected.modules, path
        assert tuple(sorted({s.r for s in adapter.modules.values()})) == expected.ranks, path
        assert adapter.config.modules_to_save == expected.to_save, path
    assert seen >= {k.split("#")[0] for k in EXPECTED}, "table entries that match no corpus file"


@pytest.mark.parametrize("key", [k for k, v in EXPECTED.items() if isinstance(v, Converts)])
def test_convertible_corpus_adapters_inspect_and_round_trip(corpus: Path, key: str, tmp_path: Path) -> None:
    expected = EXPECTED[key]
    source = corpus / key
    adapter = _convert(source, expected, allow_pickle=True)
    saved = lora_hub.save_adapter(adapter, tmp_path / "adapter.safetensors")
    summary = lora_hub.summarize(saved)
    assert summary.module_count == expected.modules and summary.layout == "lora-hub"
    assert lora_hub.summarize(source, allow_pickle=True, **expected.options).module_count == expected.modules
    exported = lora_hub.to_peft(lora_hub.load_adapter(saved), tmp_path / "peft")
    after = load_file(exported / "adapter_model.safetensors")
    if any(s.enable_lora for s in adapter.modules.values()):
        return  # expanded to its plain equivalent; checked against loralib below
    for name, tensor in adapter.tensors.items():
        assert torch.equal(after[name], tensor) and after[name].dtype == tensor.dtype, name


def test_early_peft_bloom_checkpoint_matches_loralib_and_its_base(corpus: Path, tmp_path: Path) -> None:
    """The founding layout: BLOOM-560m's fused query_key_value with enable_lora [T, F, T] and lora_B as a Conv1d
    weight. The base config (built on the meta device, no weights) shows query_key_value is an nn.Linear."""
    from transformers import BloomConfig

    source = corpus / "odd/peft-legacy-mergedlinear-bloom"
    base = tmp_path / "bloom-560m"
    BloomConfig(hidden_size=1024, n_layer=24, n_head=16, vocab_size=250880,
                architectures=["BloomForCausalLM"]).save_pretrained(base)
    with pytest.warns(lora_hub.LoraHubWarning, match="fan_in_fan_out corrected for 24"):
        adapter = lora_hub.convert_adapter(source, allow_pickle=True, base=base)
    module = "transformer.h.0.self_attention.query_key_value"
    spec = adapter.modules[module]
    assert (spec.r, spec.alpha, spec.enable_lora, spec.in_features, spec.out_features, spec.fan_in_fan_out) == (
        8, 16, (True, False, True), 1024, 3072, False)
    state = torch.load(source / "adapter_model.bin", map_location="cpu", weights_only=True)
    layer = loralib.MergedLinear(1024, 3072, r=8, lora_alpha=16, enable_lora=[True, False, True])
    layer.lora_A.data = state[f"base_model.model.{module}.lora_A.weight"]
    layer.lora_B.data = state[f"base_model.model.{module}.lora_B.weight"][:, :, 0]
    delta = adapter.delta_weight(module)
    torch.testing.assert_close(delta, layer.merge_AB() * layer.scaling, rtol=1e-6, atol=1e-7)
    plain = lora_hub.convert.expand_enable_lora(adapter)
    assert plain.modules[module].r == 16 and plain.modules[module].enable_lora is None
    torch.testing.assert_close(plain.delta_weight(module), delta, rtol=1e-6, atol=1e-7)


def _stand_in(model_class: str, **config) -> torch.nn.Module:
    import transformers

    with torch.random.fork_rng():
        torch.manual_seed(0)
        cls = getattr(transformers, model_class)
        return cls(cls.config_class(**config)).eval()


@pytest.mark.parametrize("key, model_class, config", [
    ("peft/gpt2-tigrinya", "GPT2LMHeadModel", {"vocab_size": 512, "n_positions": 64}),
    ("peft/tashu014-distilbert-imdb", "DistilBertForSequenceClassification", {"vocab_size": 512}),
])
def test_real_adapters_give_the_same_logits_in_peft(corpus: Path, key: str, model_class: str, config: dict,
                                                    tmp_path: Path) -> None:
    """On a random stand-in base with the real dimensions, PeftModel gives the same logits for the original and
    for the lora-hub round trip (heads saved in modules_to_save included)."""
    source = corpus / key
    base = _stand_in(model_class, **config)
    base.save_pretrained(tmp_path / "base")
    adapter = lora_hub.convert_adapter(source, base=tmp_path / "base")
    exported = lora_hub.to_peft(lora_hub.load_adapter(lora_hub.save_adapter(adapter, tmp_path / "a.safetensors")),
                                tmp_path / "peft")
    assert json.loads((exported / "adapter_config.json").read_text())["base_model_name_or_path"] == json.loads(
        (source / "adapter_config.json").read_text(encoding="utf-8-sig"))["base_model_name_or_path"]
    tokens = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = PeftModel.from_pretrained(_stand_in(model_class, **config), source).eval()(tokens).logits
        actual = PeftModel.from_pretrained(_stand_in(model_class, **config), exported).eval()(tokens).logits
        plain = base(tokens).logits
    assert torch.equal(actual, expected)
    assert not torch.allclose(expected, plain)
