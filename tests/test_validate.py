"""lora_hub.validate: the header, full and base tiers, the profiles, hostile files, and the corpus verdicts."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSequenceClassification

import lora_hub
from lora_hub.convert.layouts import detect_layout
from lora_hub.findings import CATALOGUE, catalogue_markdown
from lora_hub.scan import scan_file
from lora_hub.testing import random_peft_adapter, tiny_config, tiny_model

from .conftest import SPEC
from .factories import random_adapter

VECTORS = SPEC / "vectors"
MANIFEST = json.loads((VECTORS / "manifest.json").read_text())
LLAMA_Q = "model.layers.{}.self_attn.q_proj"


def _llama_adapter(*, layers=2, seed=0, b_scale=1.0, fan_in_fan_out=False, base=True, **config) -> lora_hub.Adapter:
    """An adapter for the tiny Llama's q_proj layers with random factors."""
    spec = lora_hub.ModuleSpec(r=4, alpha=8, in_features=64, out_features=64, fan_in_fan_out=fan_in_fan_out)
    modules = {LLAMA_Q.format(i): spec for i in range(layers)}
    ref = lora_hub.BaseModelRef(name="tiny-llama", model_type="llama") if base else None
    cfg = lora_hub.AdapterConfig(modules=modules, base_model=ref, **config)
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for module in modules:
        a, b = cfg.lora_tensor_names(module)
        tensors[a] = torch.randn(4, 64, generator=generator)
        tensors[b] = torch.randn(64, 4, generator=generator) * b_scale
    return lora_hub.Adapter(cfg, tensors)


def _codes(report: lora_hub.ValidationReport) -> list[str]:
    return [f.code for f in report.findings]


@pytest.mark.parametrize("name, code", sorted({**MANIFEST["invalid"]}.items()))
def test_conformance_vectors_give_exactly_their_code(name: str, code: str) -> None:
    report = lora_hub.validate(VECTORS / name, profile="lora-hub")
    assert _codes(report) == [code] and not report.ok


@pytest.mark.parametrize("name", sorted(MANIFEST["valid"]))
def test_valid_vectors_are_valid(name: str) -> None:
    report = lora_hub.validate(VECTORS / name)
    assert report.ok, report.findings
    assert report.tiers == ["header", "full"]
    assert ("CHECKSUM_VERIFIED" in _codes(report)) == (lora_hub.read_header(VECTORS / name).config.tensors_sha256
                                                       is not None)


def test_header_tier_reads_no_tensor_data_and_imports_no_torch(tmp_path: Path) -> None:
    spec = lora_hub.ModuleSpec(r=1, alpha=1, in_features=2**28, out_features=1)
    config = lora_hub.AdapterConfig(modules={"m": spec})
    size = 4 * 2**28
    entries = {"base_model.model.m.lora_A.weight": {"dtype": "F32", "shape": [1, 2**28], "data_offsets": [0, size]},
               "base_model.model.m.lora_B.weight": {"dtype": "F32", "shape": [1, 1], "data_offsets": [size, size + 4]},
               "__metadata__": {"lora_hub.format_version": "1", "lora_hub.config": config.to_json()}}
    header = json.dumps(entries).encode()
    path = tmp_path / "one-gib.safetensors"
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header)
        f.truncate(8 + len(header) + size + 4)  # 1 GiB, sparse on disk
    script = textwrap.dedent(f"""
        import sys, lora_hub
        def read_bytes():
            return int(next(l for l in open("/proc/self/io") if l.startswith("rchar")).split()[1])
        before = read_bytes()
        report = lora_hub.validate({str(path)!r}, level="header", profile="vllm")
        assert report.ok and report.tiers == ["header"], report.findings
        assert read_bytes() - before < 256 * 1024, read_bytes() - before
        assert "torch" not in sys.modules
    """)
    if not Path("/proc/self/io").exists():
        pytest.skip("no /proc/self/io on this platform")
    subprocess.run([sys.executable, "-c", script], check=True)


@pytest.mark.slow
def test_hostile_files_stay_within_the_documented_memory(tmp_path: Path) -> None:
    """Every invalid vector, the large ones included (a million tiny tensors), under a 1 GiB address-space cap."""
    subprocess.run([sys.executable, str(VECTORS / "make_vectors.py"), "--large", str(tmp_path)], check=True)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    cases = {**manifest["invalid"], **manifest["invalid_large"]}
    script = textwrap.dedent(f"""
        import json, resource, sys
        resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))
        import lora_hub
        for name, code in json.loads({json.dumps(json.dumps(cases))}).items():
            report = lora_hub.validate({str(tmp_path)!r} + "/" + name, level="header", profile="lora-hub")
            assert [f.code for f in report.findings] == [code], (name, report.findings)
        assert "torch" not in sys.modules
    """)
    subprocess.run([sys.executable, "-c", script], check=True)


def test_full_tier_finds_non_finite_untrained_and_outliers(tmp_path: Path) -> None:
    broken = _llama_adapter(layers=2)
    a_name = broken.config.lora_tensor_names(LLAMA_Q.format(1))[0]
    tensors = dict(broken.tensors)
    tensors[a_name] = tensors[a_name].clone()
    tensors[a_name][0, :3] = torch.tensor([float("nan"), float("inf"), -float("inf")])
    path = lora_hub.save_adapter(lora_hub.Adapter(broken.config, tensors), tmp_path / "nan.safetensors")
    report = lora_hub.validate(path)
    finding = next(f for f in report.findings if f.code == "NON_FINITE")
    assert finding.tensor == a_name and finding.message.startswith("3 of 256")
    assert not report.ok
    assert lora_hub.validate(path, level="header").ok  # the header tier does not read contents

    untrained = lora_hub.save_adapter(_llama_adapter(b_scale=0.0), tmp_path / "untrained.safetensors")
    assert "UNTRAINED" in _codes(lora_hub.validate(untrained))

    partly = _llama_adapter(layers=6)
    tensors = dict(partly.tensors)
    b_name = partly.config.lora_tensor_names(LLAMA_Q.format(2))[1]
    tensors[b_name] = torch.zeros_like(tensors[b_name])
    big = partly.config.lora_tensor_names(LLAMA_Q.format(4))[0]
    tensors[big] = tensors[big] * 1000
    report = lora_hub.validate(lora_hub.save_adapter(lora_hub.Adapter(partly.config, tensors),
                                                     tmp_path / "partly.safetensors"))
    assert report.ok
    by_code = {f.code: f for f in report.findings}
    assert by_code["ZERO_UPDATE"].module == LLAMA_Q.format(2)
    assert by_code["MAGNITUDE_OUTLIER"].module == LLAMA_Q.format(4)
    assert by_code["MAGNITUDE_OUTLIER"].message.startswith("lora_A of")


def test_full_tier_detects_a_corrupted_byte(tmp_path: Path) -> None:
    path = lora_hub.save_adapter(_llama_adapter(), tmp_path / "a.safetensors")
    assert "CHECKSUM_VERIFIED" in _codes(lora_hub.validate(path))
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01  # a low mantissa bit of the last F32 value: still a valid float
    path.write_bytes(bytes(data))
    report = lora_hub.validate(path)
    assert _codes(report).count("CHECKSUM_MISMATCH") == 1 and not report.ok


@pytest.mark.parametrize("chunk", [8, 13, 64, 4096, 1 << 20])
def test_scan_gives_the_same_answer_for_any_chunk_size(tmp_path: Path, chunk: int) -> None:
    adapter = random_adapter(3, dtype=torch.bfloat16)
    tensors = dict(adapter.tensors)
    tensors["base_model.model.score.weight"] = tensors["base_model.model.score.weight"].clone()
    tensors["base_model.model.score.weight"][1, 2] = float("nan")
    path = lora_hub.save_adapter(lora_hub.Adapter(adapter.config, tensors), tmp_path / "a.safetensors")
    header = lora_hub.read_header(path)
    result = scan_file(header.safetensors, checksum=True, chunk_bytes=chunk)
    assert result.sha256 == header.config.tensors_sha256
    for name, tensor in tensors.items():
        stats = result.stats[name]
        finite = tensor[torch.isfinite(tensor)].float()
        assert stats.nonfinite == int((~torch.isfinite(tensor)).sum())
        assert stats.absmax == float(finite.abs().max())


def test_base_tier_checks_every_module_against_the_base(tmp_path: Path, base_dirs) -> None:
    good = lora_hub.save_adapter(_llama_adapter(), tmp_path / "good.safetensors")
    report = lora_hub.validate(good, base=base_dirs["llama"])
    assert report.ok and report.tiers == ["header", "full", "base"]
    assert "BASE_NAME_DIFFERS" in _codes(report)  # declared 'tiny-llama', given a folder named 'llama'

    shifted = _llama_adapter()
    prefixed = {f"decoder.{m}": s for m, s in shifted.modules.items()}
    config = lora_hub.AdapterConfig(modules=prefixed)
    tensors = {n.replace("base_model.model.", "base_model.model.decoder."): t for n, t in shifted.tensors.items()}
    wrong = lora_hub.save_adapter(lora_hub.Adapter(config, tensors), tmp_path / "wrong.safetensors")
    report = lora_hub.validate(wrong, base=base_dirs["llama"])
    finding = next(f for f in report.findings if f.code == "NO_MODULE_MATCHES")
    assert "removing the prefix 'decoder.' would match 2 of 2 modules" in finding.message

    transposed = lora_hub.save_adapter(_llama_adapter(fan_in_fan_out=True), tmp_path / "t.safetensors")
    assert "FAN_IN_FAN_OUT_MISMATCH" in _codes(lora_hub.validate(transposed, base=base_dirs["llama"]))
    report = lora_hub.validate(good, base=base_dirs["opt"])
    assert "NO_MODULE_MATCHES" in _codes(report) and "BASE_TYPE_DIFFERS" in _codes(report)
    wide = tmp_path / "wide"
    tiny_model("llama", hidden_size=128, intermediate_size=256).save_pretrained(wide)
    assert _codes(lora_hub.validate(good, base=wide, level="header")).count("FEATURES_MISMATCH") == 2


def test_base_tier_on_a_peft_folder_and_its_head(tmp_path: Path) -> None:
    def classifier(labels: int):
        return AutoModelForSequenceClassification.from_config(tiny_config("gpt2", num_labels=labels, pad_token_id=0))

    source = random_peft_adapter(classifier(3), tmp_path / "peft", task_type="SEQ_CLS", fan_in_fan_out=True)
    config = json.loads((source / "adapter_config.json").read_text())
    (source / "adapter_config.json").write_text(json.dumps({**config, "fan_in_fan_out": False}))
    classifier(3).save_pretrained(tmp_path / "three")
    classifier(2).save_pretrained(tmp_path / "two")
    report = lora_hub.validate(source, base=tmp_path / "three")
    assert report.ok and "FAN_IN_FAN_OUT_IN_CONFIG" in _codes(report)
    report = lora_hub.validate(source, base=tmp_path / "two")
    finding = next(f for f in report.findings if f.code == "REPLACEMENT_SHAPE_MISMATCH")
    assert finding.tensor == "base_model.model.score.weight" and "[2, 64]" in finding.message


def test_base_tier_on_an_eight_bit_model(tmp_path: Path, base_dirs) -> None:
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    model = AutoModelForCausalLM.from_pretrained(base_dirs["llama"], device_map="cpu",
                                                 quantization_config=BitsAndBytesConfig(load_in_8bit=True))
    path = lora_hub.save_adapter(_llama_adapter(), tmp_path / "a.safetensors")
    report = lora_hub.validate(path, base=model, level="header")
    assert report.ok and "QUANTIZED_BASE" in _codes(report)


def test_unavailable_base_is_a_finding(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    path = lora_hub.save_adapter(_llama_adapter(), tmp_path / "a.safetensors")
    report = lora_hub.validate(path, base="nobody/nothing")
    assert _codes(report)[-1] == "BASE_MODEL_UNAVAILABLE" and not report.ok


def test_edited_fingerprint_is_inconsistent(tmp_path: Path) -> None:
    adapter = _llama_adapter()
    ref = lora_hub.BaseModelRef(name="tiny-llama", fingerprint="sha256:" + "0" * 64)
    path = lora_hub.save_adapter(adapter.with_config(base_model=ref), tmp_path / "a.safetensors")
    assert "FINGERPRINT_INCONSISTENT" in _codes(lora_hub.validate(path, level="header"))


def test_profiles_say_where_a_file_will_work(tmp_path: Path) -> None:
    merged = lora_hub.save_adapter(random_adapter(1), tmp_path / "merged.safetensors")
    peft = lora_hub.validate(merged, profile="peft", level="header")
    assert {"PEFT_ENABLE_LORA", "PEFT_CONFIG_ABSENT"} <= set(_codes(peft)) and not peft.ok
    exported = lora_hub.to_peft(lora_hub.load_adapter(merged), tmp_path / "exported")
    assert lora_hub.validate(exported, profile="peft").ok

    vllm = lora_hub.validate(merged, profile="vllm", level="header")
    assert "VLLM_ENABLE_LORA" in _codes(vllm) and "VLLM_MODULES_TO_SAVE" not in _codes(vllm)  # a score head loads
    plain = lora_hub.save_adapter(_llama_adapter(), tmp_path / "plain.safetensors")
    vllm = lora_hub.validate(plain, profile="vllm", level="header")
    assert vllm.ok and vllm.findings[-1].message.endswith("--max-lora-rank 8 or more")
    wide = lora_hub.ModuleSpec(r=600, alpha=8, in_features=4, out_features=4)
    config = lora_hub.AdapterConfig(modules={"m": wide})
    big = lora_hub.Adapter(config, {n: torch.ones(*s) for n, s in zip(config.lora_tensor_names("m"),
                                                                          (wide.a_shape, wide.b_shape), strict=True)})
    assert "VLLM_RANK" in _codes(lora_hub.validate(lora_hub.save_adapter(big, tmp_path / "big.safetensors"),
                                                   profile="vllm", level="header"))

    strict = lora_hub.validate(plain, profile="lora-hub")
    assert strict.ok and "LORA_HUB_BASE_UNDECLARED" in _codes(strict)  # no fingerprint without --base
    defaults = lora_hub.validate(VECTORS / "valid/unknown_keys_ignored.safetensors", profile="lora-hub")
    assert {"LORA_HUB_NOT_CANONICAL", "LORA_HUB_UNKNOWN_KEY", "LORA_HUB_CHECKSUM_ABSENT"} <= set(_codes(defaults))
    assert "config.future_top_level_key" in next(f for f in defaults.findings if f.code == "LORA_HUB_UNKNOWN_KEY"
                                                 ).message
    source = random_peft_adapter(tiny_model("llama"), tmp_path / "peft")
    strict_peft = lora_hub.validate(source, profile="lora-hub")
    assert not strict_peft.ok and [f.code for f in strict_peft.errors] == ["NOT_LORA_HUB"]


def test_a_fully_declared_lora_hub_file_passes_strict(tmp_path: Path, base_dirs) -> None:
    source = random_peft_adapter(tiny_model("llama"), tmp_path / "peft")
    path = lora_hub.save_adapter(lora_hub.convert_adapter(source, base=base_dirs["llama"]), tmp_path / "a.safetensors")
    report = lora_hub.validate(path, base=base_dirs["llama"], profile="lora-hub")
    assert report.ok and [f.severity for f in report.findings] == [lora_hub.Severity.INFO] * len(report.findings)


def test_pickles_need_the_opt_in(tmp_path: Path) -> None:
    source = random_peft_adapter(tiny_model("llama"), tmp_path / "peft", safe_serialization=False)
    refused = lora_hub.validate(source)
    assert _codes(refused) == ["PICKLE_REFUSED"] and "allow_pickle=True" in refused.findings[0].fix
    assert lora_hub.validate(source, allow_pickle=True).ok


def test_report_serialises_and_usage_errors_raise(tmp_path: Path) -> None:
    report = lora_hub.validate(VECTORS / "invalid/overlapping_tensors.safetensors")
    data = json.loads(report.to_json())
    assert data["ok"] is False and data["counts"] == {"error": 1, "warning": 0, "info": 0}
    assert data["findings"][0]["code"] == "OFFSET_OVERLAP" and data["findings"][0]["severity"] == "error"
    assert data["findings"][0]["fix"] == CATALOGUE["OFFSET_OVERLAP"].fix
    with pytest.raises(ValueError, match="header, full"):
        lora_hub.validate(tmp_path, level="deep")
    with pytest.raises(ValueError, match="peft, vllm, llama.cpp, mlx, lora-hub"):
        lora_hub.validate(tmp_path, profile="tgi")


def test_every_code_is_catalogued_and_listed_in_the_spec() -> None:
    codes = {cls.code for cls in vars(lora_hub).values() if isinstance(cls, type)
             and issubclass(cls, (lora_hub.LoraHubError, lora_hub.LoraHubWarning)) and cls.code != "LORA_HUB_WARNING"}
    assert codes - {"LORA_HUB_ERROR"} <= set(CATALOGUE)
    assert (SPEC / "CODES.md").read_text() == catalogue_markdown(), "regenerate spec/CODES.md (see its header)"


EXPECTED_VERDICTS: dict[str, tuple[bool, list[str]]] = {
    "peft/gpt2-tigrinya": (True, []),
    "peft/anirudh-peft-gpt2": (True, []),
    "peft/thesotti-gpt2-bin": (True, []),
    "peft/yoonyerin-begreat-bin": (True, []),
    "peft/gradience-tiny-dialogpt": (True, ["PEFT_KEY_IGNORED"]),  # a stray "alpha" key, which PEFT ignores too
    "peft/tashu014-distilbert-imdb": (True, []),
    "peft/dayanidhi04-distilbert-emotion": (True, []),
    "peft/sidkris-bin": (True, []),
    "peft/kuntya-udacity": (False, ["MODULE_CONFLICT"]),
    "peft/hareshjethani-multitask": (True, []),
    "peft/diaoenmao-t5small-bin": (True, []),
    "peft/guilhermmeabreu-lab08": (True, []),
    "peft/chatchat-bin": (False, ["FEATURE_UNSUPPORTED"]),
    "loralib/microsoft-LoRA/roberta_base_lora_mnli.bin": (True, ["BASE_UNDECLARED"]),
    "diffusers/catundchat-sd15": (False, ["LAYOUT_UNSUPPORTED"]),
    "diffusers/hirvita6-flower": (False, ["LAYOUT_UNSUPPORTED"]),
    "diffusers/wellch4n-pokemon": (False, ["LAYOUT_UNSUPPORTED"]),
    "mlx/tesla1900-npz": (False, ["LAYOUT_UNSUPPORTED"]),
    "mlx/vtboyarc-npz": (False, ["LAYOUT_UNSUPPORTED"]),
    "gguf/gpt2-tigrinya-lora-f32.gguf": (False, ["LLAMA_CPP_ARCH"]),
    "gguf/yoonyerin-gpt2-lora-f16.gguf": (False, ["LLAMA_CPP_ARCH"]),
    "odd/hirvita6-2byte": (False, ["FILE_TRUNCATED"]),
    "odd/depi-sd-fake": (False, ["LAYOUT_UNSUPPORTED"]),
    "odd/flux-aitoolkit-mislabelled-sd15": (False, ["LAYOUT_UNSUPPORTED"]),
    "odd/finsenti-lfs-pointer": (False, ["GIT_LFS_POINTER"]),
    "odd/esm2-lfs-bin-pointer": (False, ["GIT_LFS_POINTER"]),
    "odd/lora-vit": (False, ["LAYOUT_UNKNOWN"]),
    "odd/sam-lora-rank2": (False, ["LAYOUT_UNKNOWN"]),
    "odd/peft-legacy-mergedlinear-bloom": (True, []),
    "odd/gradience-minimal-config": (False, ["WEIGHTS_MISSING"]),
    "odd/gradience-per-layer-config": (False, ["WEIGHTS_MISSING"]),
    "odd/kohya-malformed-double-prefix": (False, ["LAYOUT_UNSUPPORTED"]),
    "base_models/lmbuddy-tiny_gpt2/model.safetensors": (False, ["LAYOUT_UNKNOWN"]),
    "base_models/stories260K-llama2c/stories260K.bin": (False, ["LAYOUT_UNKNOWN"]),
}


@pytest.mark.parametrize("key", sorted(EXPECTED_VERDICTS))
def test_corpus_verdicts(corpus: Path, key: str) -> None:
    ok, codes = EXPECTED_VERDICTS[key]
    options = {"alpha": 16} if key.startswith("loralib/") else {}
    report = lora_hub.validate(corpus / key, allow_pickle=True, **options)
    assert (report.ok, _codes(report)) == (ok, codes), report.findings
    if ok and key.endswith(("-bin", ".bin")):
        assert _codes(lora_hub.validate(corpus / key, **options)) == ["PICKLE_REFUSED"]


def test_corpus_peft_adapters_for_vllm(corpus: Path) -> None:
    """The classifiers carry heads (modules_to_save) that vLLM cannot serve; the language-model adapters can be."""
    assert not lora_hub.validate(corpus / "peft/tashu014-distilbert-imdb", profile="vllm", level="header").ok
    report = lora_hub.validate(corpus / "peft/guilhermmeabreu-lab08", profile="vllm", level="header")
    assert report.ok and report.findings[-1].message.endswith("--max-lora-rank 16 or more")
    assert os.fspath(corpus) in report.source


def test_findings_from_errors_say_where(tmp_path: Path) -> None:
    import struct as _struct

    from .test_crash_inputs import with_config

    plain = lora_hub.save_adapter(_llama_adapter(), tmp_path / "plain.safetensors")
    module = next(iter(lora_hub.read_header(plain).config.modules))
    a_name = f"base_model.model.{module}.lora_A.weight"
    shape = with_config(plain, tmp_path / "shape.safetensors", **{"module:in_features": 65})
    report = lora_hub.validate(shape, level="header")
    assert report.codes == ["SHAPE_MISMATCH"] and report.findings[0].module == module
    assert report.findings[0].tensor == a_name
    data = bytearray(plain.read_bytes())
    (size,) = _struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + size])
    del header[a_name]["dtype"]
    raw = json.dumps(header).encode()
    (tmp_path / "schema.safetensors").write_bytes(_struct.pack("<Q", len(raw)) + raw + bytes(data[8 + size:]))
    report = lora_hub.validate(tmp_path / "schema.safetensors", level="header")
    assert report.codes == ["HEADER_SCHEMA"] and report.findings[0].tensor == a_name
    missing = with_config(plain, tmp_path / "missing.safetensors",
                          modules={**json.loads(lora_hub.read_safetensors_header(plain).metadata["lora_hub.config"])
                                   ["modules"], "model.extra": {"r": 4, "alpha": 8, "in_features": 64,
                                                                "out_features": 64}})
    report = lora_hub.validate(missing, level="header")
    assert report.codes == ["TENSOR_MISSING"] and report.findings[0].module == "model.extra"
    as_json = json.loads(report.to_json())["findings"][0]
    assert as_json["module"] == "model.extra" and as_json["tensor"] == "base_model.model.model.extra.lora_A.weight"


def test_a_symlink_loop_is_not_found(tmp_path: Path) -> None:
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    assert lora_hub.validate(tmp_path / "a", level="header").codes == ["NOT_FOUND"]
    with pytest.raises(lora_hub.AdapterNotFoundError):
        detect_layout(tmp_path / "a")
