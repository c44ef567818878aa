"""llama.cpp (GGUF) and mlx-lm adapters, both ways.

PEFT is the oracle throughout: an adapter PEFT wrote, converted to GGUF or mlx-lm's folder and read back, gives
PeftModel's logits again (run in CI). The runtimes themselves are the oracles of the files (marked llama_cpp and
mlx, run whenever ../shared/oracles/setup.sh has installed them): llama.cpp on the base model converted by its own
convert_hf_to_gguf.py, and mlx-lm on the transformers folder, give PeftModel's logits with the files lora-hub
writes; files their own tools wrote read back with the runtime's logits. What a runtime cannot run exactly is
refused by the writer and flagged by the profile with the same codes.
"""

from __future__ import annotations

import copy
import json
import struct
from dataclasses import replace
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from peft import PeftModel
from safetensors.torch import save_file

import lora_hub
from lora_hub.convert.runtimes import llama_cpp_problems, mlx_problems
from lora_hub.testing import LORA_TARGETS, save_tiny_model, tiny_model
from tests import oracles
from tests.peft_cases import peft_adapter

KINDS = {
    "llama-mha": ("llama", {"num_key_value_heads": 4}),
    "llama-gqa": ("llama", {}),
    "mistral": ("mistral", {}),
    # mlx-lm 0.32's qwen2 reads rope_theta, not transformers 5's rope_parameters (default 1e6): the same base for both
    "qwen2": ("qwen2", {"rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0}}),
    "qwen3": ("qwen3", {}),
}
"""Tiny bases of every architecture lora-hub maps to both runtimes (weights of std 0.1, so logits are not ~0)."""
VARIANTS = {
    "plain": {},
    "rslora": {"use_rslora": True},
    "patterns": {"rank_pattern": {"k_proj": 2, "down_proj": 8}, "alpha_pattern": {"v_proj": 3}},
    "embeddings": {"target_modules": ["q_proj", "k_proj", "embed_tokens", "lm_head"]},
}
IDS = [1, 5, 9, 33, 70, 2, 99, 7]


def _settings(kind: str) -> tuple[str, dict]:
    arch, overrides = KINDS[kind]
    return arch, {"initializer_range": 0.1, **overrides}


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("runtime-bases")
    out = {}
    for kind in KINDS:
        arch, overrides = _settings(kind)
        out[kind] = save_tiny_model(arch, root / kind, tokenizer=False, **overrides)
    return out


def _peft(kind: str, variant: str, folder: Path) -> Path:
    arch, overrides = _settings(kind)
    settings = {"target_modules": LORA_TARGETS[arch], **VARIANTS[variant]}
    return peft_adapter(folder, tiny_model(arch, **overrides), **settings)


def _peft_logits(kind: str, adapter: Path | None, dtype: torch.dtype = torch.float32) -> np.ndarray:
    arch, overrides = _settings(kind)
    model = tiny_model(arch, **overrides)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter).eval()
    with torch.no_grad():
        return model.to(dtype)(torch.tensor([IDS])).logits[0].double().numpy()


def _assert_like_peft(ours: np.ndarray, kind: str, source: Path, base: np.ndarray) -> None:
    """`ours` is PeftModel's result as closely as PeftModel's own float32 run is: both are compared with PeftModel
    in float64 (a position where attention is ill-conditioned costs float32 ~1e-4 on these tiny models)."""
    exact = _peft_logits(kind, source, torch.float64)
    own = np.abs(_peft_logits(kind, source) - exact).max()
    assert np.abs(exact - base).max() > 0.1, "the adapter barely changes the logits: the comparison is moot"
    error = np.abs(ours - exact).max()
    assert error <= 2e-5 + 2 * own, (error, own)


# --- through lora-hub and back: PEFT is the oracle (CI) ------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("kind", ["llama-gqa", "qwen2"])
def test_gguf_and_mlx_read_back_give_peftmodels_logits(bases, kind: str, variant: str, tmp_path: Path) -> None:
    source = _peft(kind, variant, tmp_path / "peft")
    adapter = lora_hub.convert_adapter(source, base=bases[kind])
    lora_hub.to_gguf(adapter, tmp_path / "adapter.gguf", base=bases[kind])
    lora_hub.to_mlx(adapter, tmp_path / "mlx", base=bases[kind])
    reference = _peft_logits(kind, source)
    assert np.abs(reference - _peft_logits(kind, None)).max() > 0.1  # the adapter matters
    for name, path in (("gguf", tmp_path / "adapter.gguf"), ("mlx", tmp_path / "mlx")):
        back = lora_hub.convert_adapter(path, base=bases[kind])
        assert back.config.provenance["converted_from"] in ("gguf", "mlx-lm")
        lora_hub.to_peft(back, tmp_path / f"peft-from-{name}")
        assert np.abs(_peft_logits(kind, tmp_path / f"peft-from-{name}") - reference).max() <= 1e-5


def test_gguf_layout_is_what_llama_cpps_loader_checks(bases, tmp_path: Path) -> None:
    """Names from the gguf package's map, the loader's shape rules against the base layers, the metadata keys, and
    one alpha with per-module scales folded into lora_B."""
    source = _peft("llama-gqa", "patterns", tmp_path / "peft")
    adapter = lora_hub.convert_adapter(source, base=bases["llama-gqa"])
    path = lora_hub.to_gguf(adapter, tmp_path / "adapter.gguf", base=bases["llama-gqa"])
    reader = gguf.GGUFReader(path)
    meta = {f.name: f.contents() for f in reader.fields.values() if not f.name.startswith("GGUF.")}
    assert meta["general.type"] == "adapter" and meta["adapter.type"] == "lora"
    assert meta["general.architecture"] == "llama" and meta["general.base_model.0.name"]
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2)
    info = lora_hub.describe_base(bases["llama-gqa"])
    tensors = {t.name: t for t in reader.tensors}
    assert len(tensors) == 2 * len(adapter.modules)
    scales = set()
    for module, spec in adapter.modules.items():
        stem = names.get_name(module) + ".weight"
        a, b = tensors[stem + ".lora_a"], tensors[stem + ".lora_b"]
        layer = info.layers[module]
        w_ne = (layer.in_features, layer.out_features)  # GGUF's ne of the base weight (out, in)
        assert int(a.shape[0]) == w_ne[0] and int(b.shape[1]) == w_ne[1] and int(a.shape[1]) == int(b.shape[0])
        assert int(b.shape[0]) == spec.r and a.tensor_type == gguf.GGMLQuantizationType.F32
        scales.add(meta["adapter.lora.alpha"] / spec.r)
        b_rows = torch.from_numpy(np.array(b.data)).double()
        ours = adapter.lora_B(module).double()
        if module.endswith(("q_proj", "k_proj")):  # permuted rows: compare as sets of row norms
            ours, b_rows = ours.norm(dim=1).sort().values, b_rows.norm(dim=1).sort().values
        ratio = (b_rows.norm() / ours.norm()).item()
        assert ratio == pytest.approx(spec.scaling * spec.r / meta["adapter.lora.alpha"], rel=1e-6)
    assert len(scales) > 1  # mixed ranks: llama.cpp scales each by alpha / its own rank


@pytest.mark.parametrize("outtype", ["f16", "bf16", "q8_0"])
def test_gguf_outtypes(bases, outtype: str, tmp_path: Path) -> None:
    source = _peft("llama-gqa", "plain", tmp_path / "peft")
    adapter = lora_hub.convert_adapter(source, base=bases["llama-gqa"])
    path = lora_hub.to_gguf(adapter, tmp_path / "adapter.gguf", base=bases["llama-gqa"], outtype=outtype)
    kinds = {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}
    expected = outtype.upper()
    # q8_0 needs rows of 32 values: lora_a's rows (the layer's inputs) have them, lora_b's (r = 4) fall back to F16
    assert {k for n, k in kinds.items() if n.endswith(".lora_a")} == {expected}
    assert {k for n, k in kinds.items() if n.endswith(".lora_b")} == {"F16" if outtype == "q8_0" else expected}
    back = lora_hub.from_gguf(path, base=bases["llama-gqa"])
    tolerance = {"f16": 2e-3, "bf16": 2e-2, "q8_0": 2e-2}[outtype]
    for module in adapter.modules:
        delta, ours = adapter.delta_weight(module), back.delta_weight(module, dtype=torch.float32)
        assert (delta - ours).abs().max() <= tolerance * delta.abs().max()


def test_mlx_layout_is_what_load_adapters_expects(bases, tmp_path: Path) -> None:
    source = _peft("llama-gqa", "patterns", tmp_path / "peft")
    adapter = lora_hub.convert_adapter(source, base=bases["llama-gqa"])
    folder = lora_hub.to_mlx(adapter, tmp_path / "mlx", base=bases["llama-gqa"])
    config = json.loads((folder / "adapter_config.json").read_text())
    params = config["lora_parameters"]
    assert config["fine_tune_type"] == "lora" and params["rank"] == 8 and params["dropout"] == 0.0
    # every block adapts the same seven layers: relative keys over the last 2 blocks, as mlx-lm's trainer writes
    assert config["num_layers"] == 2 and params["keys"] == sorted(f"{p}.{n}" for p, n in (
        ("self_attn", "q_proj"), ("self_attn", "k_proj"), ("self_attn", "v_proj"), ("self_attn", "o_proj"),
        ("mlp", "gate_proj"), ("mlp", "up_proj"), ("mlp", "down_proj")))
    from safetensors.torch import load_file

    tensors = load_file(folder / "adapters.safetensors")
    assert len(tensors) == 2 * len(adapter.modules)
    for module, spec in adapter.modules.items():
        a, b = tensors[f"{module}.lora_a"], tensors[f"{module}.lora_b"]
        assert a.shape == (spec.in_features, 8) and b.shape == (8, spec.out_features)
        assert not a[:, spec.r:].any() and not b[spec.r:].any()  # zero-padded to the file's rank
        folded = params["scale"] * b[:spec.r].double()
        assert torch.allclose(folded, spec.scaling * adapter.lora_B(module).T.double(), atol=1e-6)


def test_mlx_keys_are_full_paths_when_blocks_differ(bases, tmp_path: Path) -> None:
    source = _peft("llama-gqa", "plain", tmp_path / "peft")
    adapter = lora_hub.convert_adapter(source, base=bases["llama-gqa"])
    first_block = {m: s for m, s in adapter.modules.items() if m.startswith("model.layers.0.")}
    partial = adapter.derived(replace(adapter.config, modules=first_block), adapter.tensors)
    folder = lora_hub.to_mlx(partial, tmp_path / "mlx", base=bases["llama-gqa"])
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["lora_parameters"]["keys"] == sorted(first_block) and config["num_layers"] == -1
    back = lora_hub.from_mlx(folder, base=bases["llama-gqa"])
    assert set(back.modules) == set(first_block)


# --- what each runtime cannot run: the writer and the profile agree ------------------------------------------------


def _with_base(name: str):
    from tests.peft_cases import BUILDERS

    return BUILDERS[name]()


REFUSED = {
    # name: (base builder, PEFT settings, codes for llama.cpp, codes for mlx-lm)
    "dora": ("llama", {"use_dora": True}, {"LLAMA_CPP_DORA"}, set()),
    "lora_bias": ("llama", {"lora_bias": True}, {"LLAMA_CPP_LORA_BIAS"}, {"MLX_LORA_BIAS"}),
    "modules_to_save": ("llama", {"modules_to_save": ["lm_head"], "target_modules": ["q_proj"]},
                        {"LLAMA_CPP_MODULES_TO_SAVE"}, {"MLX_MODULES_TO_SAVE"}),
    "trainable_tokens": ("llama", {"trainable_token_indices": {"embed_tokens": [1, 2]}},
                         {"LLAMA_CPP_TRAINABLE_TOKENS"}, {"MLX_TRAINABLE_TOKENS"}),
    "tied_embedding": ("tied", {"target_modules": ["q_proj", "embed_tokens"]}, {"LLAMA_CPP_TIED"}, {"MLX_TIED"}),
    "gpt2": ("gpt2", {"target_modules": ["c_attn"]}, {"LLAMA_CPP_ARCH"}, {"MLX_ARCH"}),
    "resized_vocabulary": ("resized", {"target_modules": ["q_proj", "embed_tokens"]},
                           {"LLAMA_CPP_BASE_WEIGHTS_DIFFER"}, {"MLX_BASE_WEIGHTS_DIFFER"}),
}


@pytest.mark.parametrize("case", REFUSED)
def test_writers_refuse_by_name_what_profiles_flag(case: str, tmp_path: Path) -> None:
    builder, settings, llama_codes, mlx_codes = REFUSED[case]
    settings = {"target_modules": ["q_proj", "v_proj"], **settings}
    model = _with_base(builder)
    source = peft_adapter(tmp_path / "peft", model, **settings)
    judged = "llama" if case == "resized_vocabulary" else builder  # the original vocabulary's base
    base = tmp_path / "base"
    (_with_base(judged) if judged != builder else model).save_pretrained(base)
    for profile, writer, codes, output in (
            ("llama.cpp", lora_hub.to_gguf, llama_codes, tmp_path / "adapter.gguf"),
            ("mlx", lora_hub.to_mlx, mlx_codes, tmp_path / "mlx")):
        report = lora_hub.validate(source, base=base, profile=profile)
        prefix = "LLAMA_CPP_" if profile == "llama.cpp" else "MLX_"
        assert {f.code for f in report.findings if f.code.startswith(prefix)} == codes, report.findings
        adapter = lora_hub.convert_adapter(source, base=base)
        if codes:
            with pytest.raises(lora_hub.ExportError) as refused:
                writer(adapter, output, base=base)
            assert refused.value.code in codes and not output.exists()
        else:
            writer(adapter, output, base=base)
            assert output.exists()


def test_mlx_refuses_dora_on_some_modules_only(tmp_path: Path) -> None:
    model = tiny_model("llama")
    adapter = lora_hub.convert_adapter(peft_adapter(tmp_path / "peft", model, target_modules=["q_proj", "v_proj"],
                                                    use_dora=True), base=model)
    plain = next(iter(adapter.modules))
    modules = {**adapter.modules, plain: replace(adapter.modules[plain], dora=False)}
    tensors = {n: t for n, t in adapter.tensors.items() if n != adapter.modules[plain].tensor_names(plain).magnitude}
    mixed = adapter.derived(replace(adapter.config, modules=modules), tensors)
    assert [p.code for p in mlx_problems(mixed.config, lora_hub.describe_base(model), lambda m: None)] == ["MLX_DORA"]
    with pytest.raises(lora_hub.ExportError, match="DoRA on 3 of 4 modules") as refused:
        lora_hub.to_mlx(mixed, tmp_path / "mlx", base=model)
    assert refused.value.code == "MLX_DORA"


def test_profiles_without_a_base_say_what_they_cannot_check(tmp_path: Path) -> None:
    adapter = lora_hub.convert_adapter(peft_adapter(tmp_path / "peft", tiny_model("llama"),
                                                    target_modules=["q_proj", "embed_tokens"]))
    assert [p.code for p in llama_cpp_problems(adapter.config, None, lambda m: None)] == [
        "LLAMA_CPP_BASE_WEIGHTS", "LLAMA_CPP_BASE_UNKNOWN"]
    codes = {f.code: f.severity.value for f in lora_hub.validate(tmp_path / "peft", profile="mlx").findings
             if f.code.startswith("MLX_")}
    assert codes == {"MLX_BASE_WEIGHTS": "warning", "MLX_BASE_UNKNOWN": "warning"}


# --- reading what others wrote, and what no runtime would load -------------------------------------------------------


def _gguf(path: Path, tensors: dict[str, np.ndarray], **meta) -> Path:
    writer = gguf.GGUFWriter(path, meta.pop("arch", "llama"))
    writer.add_type(meta.pop("type", "adapter"))
    writer.add_string("adapter.type", meta.pop("adapter_type", "lora"))
    writer.add_float32("adapter.lora.alpha", meta.pop("alpha", 8.0))
    if "invocation_tokens" in meta:  # an aLoRA adapter
        writer.add_array("adapter.alora.invocation_tokens", meta.pop("invocation_tokens"))
    for name, data in tensors.items():
        writer.add_tensor(name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_gguf_written_elsewhere_reads_with_llama_cpps_meaning(bases, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((4, 64), dtype=np.float32), rng.standard_normal((128, 4), dtype=np.float32)
    path = _gguf(tmp_path / "x.gguf", {"blk.1.ffn_up.weight.lora_a": a, "blk.1.ffn_up.weight.lora_b": b,
                                       "blk.1.attn_norm.weight": np.ones(64, np.float32)}, alpha=0.0)
    adapter = lora_hub.from_gguf(path, base=bases["llama-gqa"])
    spec = adapter.modules["model.layers.1.mlp.up_proj"]
    assert list(adapter.modules) == ["model.layers.1.mlp.up_proj"]  # norm vectors: skipped, as llama.cpp skips them
    assert spec.scaling == 1.0  # alpha 0: llama.cpp's scale is the user's alone
    assert torch.equal(adapter.lora_A("model.layers.1.mlp.up_proj"), torch.from_numpy(a))
    negative = _gguf(tmp_path / "neg.gguf", {"blk.1.ffn_up.weight.lora_a": a, "blk.1.ffn_up.weight.lora_b": b},
                     alpha=-8.0)
    flipped = lora_hub.from_gguf(negative, base=bases["llama-gqa"])
    assert torch.allclose(flipped.delta_weight("model.layers.1.mlp.up_proj"),
                          -2 * adapter.delta_weight("model.layers.1.mlp.up_proj"))
    with pytest.raises(lora_hub.ParameterRequiredError):
        lora_hub.convert_adapter(path)  # no base given or declared: the names cannot be mapped back
    report = lora_hub.validate(path, base=bases["llama-gqa"], profile="llama.cpp")
    assert report.ok and report.layout.startswith("gguf")


@pytest.mark.parametrize("case", ["truncated", "model", "unpaired", "misshapen", "unknown_suffix", "counts",
                                  "wrong_arch", "alora"])
def test_gguf_files_llama_cpp_would_refuse_are_refused(bases, case: str, tmp_path: Path) -> None:
    a, b = np.zeros((4, 64), np.float32), np.ones((128, 4), np.float32)
    good = {"blk.0.ffn_up.weight.lora_a": a, "blk.0.ffn_up.weight.lora_b": b}
    expected = "GGUF_INVALID"
    if case == "truncated":
        path = _gguf(tmp_path / "x.gguf", good)
        path.write_bytes(path.read_bytes()[:-200])
    elif case == "model":
        path = _gguf(tmp_path / "x.gguf", good, type="model")
    elif case == "unpaired":
        path = _gguf(tmp_path / "x.gguf", {"blk.0.ffn_up.weight.lora_a": a})
    elif case == "misshapen":
        path = _gguf(tmp_path / "x.gguf", {"blk.0.ffn_up.weight.lora_a": a, "blk.0.ffn_up.weight.lora_b": b[:64]})
    elif case == "unknown_suffix":
        path = _gguf(tmp_path / "x.gguf", {**good, "blk.0.ffn_up.weight": b})
    elif case == "counts":
        path = tmp_path / "x.gguf"
        path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 2**40, 2**40) + bytes(64))
    elif case == "wrong_arch":
        path, expected = _gguf(tmp_path / "x.gguf", good, arch="qwen2"), "BASE_MISMATCH"
    else:
        path, expected = _gguf(tmp_path / "x.gguf", good, invocation_tokens=[1, 2]), "FEATURE_ALORA"
    with pytest.raises(lora_hub.LoraHubError) as raised:
        lora_hub.convert_adapter(path, base=bases["llama-gqa"])
    assert raised.value.code == expected, raised.value
    report = lora_hub.validate(path, base=bases["llama-gqa"])
    assert not report.ok and report.errors[0].code == expected


def _mlx_folder(folder: Path, tensors: dict[str, torch.Tensor], **config) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, folder / "adapters.safetensors")
    settings = {"fine_tune_type": "lora", "num_layers": 1,
                "lora_parameters": {"rank": 4, "scale": 10.0, "dropout": 0.0}, **config}
    (folder / "adapter_config.json").write_text(json.dumps(settings))
    return folder


@pytest.mark.parametrize("case", ["no_scale", "outside_num_layers", "outside_keys", "other_rank", "full",
                                  "unknown_leaf", "experts"])
def test_mlx_folders_mlx_lm_would_refuse_are_refused(bases, case: str, tmp_path: Path) -> None:
    a, b = torch.ones(64, 4), torch.ones(4, 64)
    block1 = {"model.layers.1.self_attn.q_proj.lora_a": a, "model.layers.1.self_attn.q_proj.lora_b": b}
    block0 = {k.replace("layers.1", "layers.0"): v for k, v in block1.items()}
    expected, tensors, config = "MLX_CONFIG_INVALID", block1, {}
    if case == "no_scale":
        config = {"lora_parameters": {"rank": 4, "alpha": 16, "dropout": 0.0}}
    elif case == "outside_num_layers":
        tensors = block0
    elif case == "outside_keys":
        config = {"lora_parameters": {"rank": 4, "scale": 10.0, "dropout": 0.0, "keys": ["self_attn.v_proj"]}}
    elif case == "other_rank":
        config = {"lora_parameters": {"rank": 8, "scale": 10.0, "dropout": 0.0}}
    elif case == "full":
        config, expected = {"fine_tune_type": "full"}, "FEATURE_UNSUPPORTED"
    elif case == "unknown_leaf":
        tensors = {**block1, "model.layers.1.self_attn.q_proj.bias": torch.ones(64)}
    else:
        tensors = {"model.layers.1.mlp.switch_mlp.up_proj.lora_a": torch.ones(4, 4, 64),
                   "model.layers.1.mlp.switch_mlp.up_proj.lora_b": torch.ones(4, 64, 4)}
        config = {"num_layers": -1, "lora_parameters": {"rank": 4, "scale": 10.0, "dropout": 0.0,
                                                        "keys": ["mlp.switch_mlp.up_proj"]}}
        expected = "FEATURE_MLX_EXPERTS"
    folder = _mlx_folder(tmp_path / "mlx", tensors, **config)
    with pytest.raises(lora_hub.LoraHubError) as raised:
        lora_hub.convert_adapter(folder, base=bases["llama-gqa"])
    assert raised.value.code == expected, raised.value
    good = _mlx_folder(tmp_path / "good", block1)
    assert list(lora_hub.convert_adapter(good, base=bases["llama-gqa"]).modules) == [
        "model.layers.1.self_attn.q_proj"]
    with pytest.raises(lora_hub.ParameterRequiredError):  # num_layers 1: which block is last needs the base
        lora_hub.convert_adapter(good)


def test_cli_converts_inspects_and_validates_runtime_layouts(bases, tmp_path: Path) -> None:
    from click.testing import CliRunner
    from lora_hub_cli.main import cli

    source = _peft("llama-gqa", "rslora", tmp_path / "peft")
    base = str(bases["llama-gqa"])
    runner = CliRunner()
    out = runner.invoke(cli, ["convert", str(source), "-o", str(tmp_path / "a.gguf"), "--to", "gguf", "--base", base,
                               "--outtype", "f16"])
    assert out.exit_code == 0, out.output
    out = runner.invoke(cli, ["convert", str(source), "-o", str(tmp_path / "mlx"), "--to", "mlx", "--base", base])
    assert out.exit_code == 0, out.output
    out = runner.invoke(cli, ["inspect", str(tmp_path / "a.gguf"), "--base", base, "--json"])
    assert out.exit_code == 0 and json.loads(out.output)["module_count"] == 14, out.output
    out = runner.invoke(cli, ["validate", str(tmp_path / "mlx"), "--base", base, "--profile", "mlx"])
    assert out.exit_code == 0 and "valid (mlx-lm" in out.output, out.output
    out = runner.invoke(cli, ["convert", str(source), "-o", str(tmp_path / "x.safetensors"), "--outtype", "f16"])
    assert out.exit_code == 2 and "--outtype is for --to gguf" in out.output
    tied = tmp_path / "tied"
    tiny_model("llama", tie_word_embeddings=True).save_pretrained(tied)
    refused = peft_adapter(tmp_path / "emb", tiny_model("llama", tie_word_embeddings=True),
                           target_modules=["q_proj", "embed_tokens"])
    out = runner.invoke(cli, ["convert", str(refused), "-o", str(tmp_path / "t.gguf"), "--to", "gguf", "--base",
                               str(tied)])
    assert out.exit_code != 0 and "LLAMA_CPP_TIED" in out.output and not (tmp_path / "t.gguf").exists()


# --- the runtimes themselves (oracles; ../shared/oracles/setup.sh) --------------------------------------------------


@pytest.fixture(scope="module")
def gguf_bases(bases, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    oracles.need_llama_cpp()
    root = tmp_path_factory.mktemp("gguf-bases")
    out = {}
    for kind, folder in bases.items():
        with_tokenizer = root / kind
        with_tokenizer.mkdir()
        for item in folder.iterdir():
            (with_tokenizer / item.name).symlink_to(item)
        oracles.add_sentencepiece_tokenizer(with_tokenizer, 100)
        out[kind] = oracles.gguf_base(with_tokenizer, root / f"{kind}.gguf")
    return out


@pytest.mark.llama_cpp
@pytest.mark.slow
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("kind", KINDS)
def test_llama_cpp_runs_our_gguf_with_peftmodels_logits(bases, gguf_bases, kind: str, variant: str,
                                                        tmp_path: Path) -> None:
    source = _peft(kind, variant, tmp_path / "peft")
    adapter = lora_hub.convert_adapter(source, base=bases[kind])
    path = lora_hub.to_gguf(adapter, tmp_path / "adapter.gguf", base=bases[kind])
    ours = oracles.llama_cpp_logits(gguf_bases[kind], path, IDS)
    _assert_like_peft(ours, kind, source, oracles.llama_cpp_logits(gguf_bases[kind], None, IDS))


@pytest.mark.llama_cpp
@pytest.mark.slow
@pytest.mark.parametrize("variant", ["plain", "rslora"])
def test_llama_cpps_own_converter_against_ours(bases, gguf_bases, variant: str, tmp_path: Path) -> None:
    """convert_lora_to_gguf.py reads only the global lora_alpha: right for a plain adapter, wrong (silently) for
    rsLoRA. lora-hub reads its files with llama.cpp's meaning either way."""
    kind = "llama-gqa"
    source = _peft(kind, variant, tmp_path / "peft")
    theirs = tmp_path / "theirs.gguf"
    oracles.llama_cpp_script("convert_lora_to_gguf.py", "--base", bases[kind], "--outtype", "f32", "--outfile",
                             theirs, source)
    reference = _peft_logits(kind, source)
    llama_theirs = oracles.llama_cpp_logits(gguf_bases[kind], theirs, IDS)
    wrong = np.abs(llama_theirs - reference).max()
    assert (wrong <= 5e-5) if variant == "plain" else (wrong > 1e-2), wrong
    read = lora_hub.convert_adapter(theirs, base=bases[kind])  # llama.cpp's meaning of their file
    lora_hub.to_peft(read, tmp_path / "peft-from-theirs")
    assert np.abs(_peft_logits(kind, tmp_path / "peft-from-theirs") - llama_theirs).max() <= 5e-5
    ours = lora_hub.to_gguf(lora_hub.convert_adapter(source, base=bases[kind]), tmp_path / "ours.gguf",
                            base=bases[kind])
    assert np.abs(oracles.llama_cpp_logits(gguf_bases[kind], ours, IDS) - reference).max() <= 5e-5


@pytest.mark.mlx
@pytest.mark.parametrize("variant", [*VARIANTS, "dora"])
@pytest.mark.parametrize("kind", KINDS)
def test_mlx_lm_runs_our_folder_with_peftmodels_logits(bases, kind: str, variant: str, tmp_path: Path) -> None:
    oracles.need_mlx()
    arch, overrides = _settings(kind)
    settings = {"target_modules": LORA_TARGETS[arch], **VARIANTS.get(variant, {"use_dora": True})}
    source = peft_adapter(tmp_path / "peft", tiny_model(arch, **overrides), **settings)
    adapter = lora_hub.convert_adapter(source, base=bases[kind])
    folder = lora_hub.to_mlx(adapter, tmp_path / "mlx", base=bases[kind])
    ours = oracles.mlx_logits(bases[kind], folder, IDS)
    _assert_like_peft(ours, kind, source, oracles.mlx_logits(bases[kind], None, IDS))


@pytest.mark.mlx
@pytest.mark.parametrize("fine_tune_type", ["lora", "dora"])
def test_an_adapter_mlx_lm_made_reads_with_mlx_lms_logits(bases, fine_tune_type: str, tmp_path: Path) -> None:
    """mlx-lm's own trainer layout (default keys, the last block only), its tensors saved by mlx: lora-hub's run time
    and PeftModel (through to_peft) give mlx-lm's logits."""
    oracles.need_mlx()
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from mlx_lm.utils import load_model

    kind = "llama-gqa"
    model, _ = load_model(bases[kind])
    settings = {"rank": 4, "scale": 2.0, "dropout": 0.0}
    model.freeze()  # as mlx-lm's trainer does: only the adapter is trainable, and saved
    linear_to_lora_layers(model, 1, settings, use_dora=fine_tune_type == "dora")
    mx.random.seed(0)
    trained = {name: mx.random.normal(value.shape) * 0.1 + (value if name.endswith(".m") else 0)
               for name, value in tree_flatten(model.trainable_parameters())}
    folder = tmp_path / "mlx"
    folder.mkdir()
    mx.save_safetensors(str(folder / "adapters.safetensors"), trained)
    (folder / "adapter_config.json").write_text(json.dumps({
        "model": str(bases[kind]), "fine_tune_type": fine_tune_type, "num_layers": 1, "lora_parameters": settings}))
    reference = oracles.mlx_logits(bases[kind], folder, IDS)
    adapter = lora_hub.convert_adapter(folder)  # the base comes from the config's "model"
    assert {m.rsplit(".", 1)[0] for m in adapter.modules} == {"model.layers.1.self_attn", "model.layers.1.mlp"}
    assert np.abs(reference - oracles.mlx_logits(bases[kind], None, IDS)).max() > 0.1  # the adapter matters
    arch, overrides = _settings(kind)
    model = tiny_model(arch, **overrides)
    runtime = lora_hub.attach(copy.deepcopy(model))
    runtime.load("mlx", adapter)
    runtime.use("mlx")
    with torch.no_grad():
        ours = runtime.model(torch.tensor([IDS])).logits[0].numpy()
    lora_hub.to_peft(adapter, tmp_path / "peft")
    exact = _peft_logits(kind, tmp_path / "peft", torch.float64)  # what the read adapter means, in float64
    own = np.abs(_peft_logits(kind, tmp_path / "peft") - exact).max()
    for logits in (reference, ours):  # mlx-lm's and lora-hub's, both float32
        assert np.abs(logits - exact).max() <= 2e-5 + 2 * own, (np.abs(logits - exact).max(), own)


def test_runtime_loads_gguf_and_mlx_adapters_by_path(bases, tmp_path: Path) -> None:
    """attach(model).load reads both layouts with the live model as the base that names their tensors."""
    source = _peft("llama-gqa", "rslora", tmp_path / "peft")
    adapter = lora_hub.convert_adapter(source, base=bases["llama-gqa"])
    lora_hub.to_gguf(adapter, tmp_path / "adapter.gguf", base=bases["llama-gqa"])
    lora_hub.to_mlx(adapter, tmp_path / "mlx", base=bases["llama-gqa"])
    arch, overrides = _settings("llama-gqa")
    model = tiny_model(arch, **overrides)
    runtime = lora_hub.attach(model)
    runtime.load("gguf", tmp_path / "adapter.gguf")
    runtime.load("mlx", tmp_path / "mlx")
    reference = _peft_logits("llama-gqa", source)
    for name in ("gguf", "mlx"):
        runtime.use(name)
        with torch.no_grad():
            ours = model(torch.tensor([IDS])).logits[0].numpy()
        assert np.abs(ours - reference).max() <= 1e-5


def test_mutated_gguf_files_get_a_verdict_not_a_crash(bases, tmp_path: Path) -> None:
    """Every byte the reader trusts is bounded: flipped, truncated or extended files raise a LoraHubError (or read,
    when the change is harmless), never another exception, and never allocate by a count read from the file."""
    source = _peft("llama-gqa", "plain", tmp_path / "peft")
    adapter = lora_hub.convert_adapter(source, base=bases["llama-gqa"])
    good = lora_hub.to_gguf(adapter, tmp_path / "adapter.gguf", base=bases["llama-gqa"]).read_bytes()
    rng = np.random.default_rng(0)
    path = tmp_path / "mutated.gguf"
    outcomes = set()
    for trial in range(300):
        data = bytearray(good)
        if trial % 3 == 0:
            data = data[: int(rng.integers(0, len(data)))]
        else:
            for _ in range(int(rng.integers(1, 4))):
                at = int(rng.integers(0, min(len(data), 4096)))  # the header and metadata, where counts live
                data[at] = int(rng.integers(0, 256))
        path.write_bytes(bytes(data))
        try:
            lora_hub.convert_adapter(path, base=bases["llama-gqa"])
            outcomes.add("read")
        except lora_hub.LoraHubError as e:
            outcomes.add(e.code)
    assert "GGUF_INVALID" in outcomes and len(outcomes) > 1


_FORCED_TIED = """
import sys
from pathlib import Path
import lora_hub
import lora_hub.convert.llamacpp as writer
from tests import oracles
writer.llama_cpp_problems = lambda *args: []  # what to_gguf refuses, written anyway
adapter = lora_hub.convert_adapter(sys.argv[1], base=sys.argv[2])
path = lora_hub.to_gguf(adapter, Path(sys.argv[3]) / "forced.gguf", base=sys.argv[2])
oracles.llama_cpp_logits(Path(sys.argv[4]), path, [1, 5, 9])
print("llama.cpp ran it")
"""


@pytest.mark.llama_cpp
@pytest.mark.slow
def test_llama_cpp_aborts_on_the_tied_embedding_adapter_we_refuse(tmp_path: Path) -> None:
    """Why LLAMA_CPP_TIED is an error: llama.cpp applies a token_embd adapter to the tied output projection too, and
    aborts there (GGML_ASSERT in build_lora_mm). Run in a child process, which it kills."""
    import subprocess
    import sys

    oracles.need_llama_cpp()
    overrides = {"initializer_range": 0.1, "tie_word_embeddings": True}
    base = save_tiny_model("llama", tmp_path / "base", tokenizer=False, **overrides)
    oracles.add_sentencepiece_tokenizer(base, 100)
    base_gguf = oracles.gguf_base(base, tmp_path / "base.gguf")
    source = peft_adapter(tmp_path / "peft", tiny_model("llama", **overrides),
                          target_modules=["q_proj", "embed_tokens"])
    with pytest.raises(lora_hub.ExportError, match="aborts"):
        lora_hub.to_gguf(lora_hub.convert_adapter(source, base=base), tmp_path / "refused.gguf", base=base)
    arguments = [str(source), str(base), str(tmp_path), str(base_gguf)]
    result = subprocess.run([sys.executable, "-c", _FORCED_TIED, *arguments], capture_output=True, text=True,
                            timeout=300, cwd=Path(__file__).resolve().parents[1])
    assert result.returncode != 0 and "GGML_ASSERT" in result.stderr and "llama.cpp ran it" not in result.stdout
