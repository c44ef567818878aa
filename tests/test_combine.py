"""combine: exact delta-space methods against the sums of the sources' updates, the SVD's error against the
discarded singular values, and PEFT's add_weighted_adapter as the oracle for cat (logits) and for the A/B methods
(tensors, bit for bit, the random ones with the same seed)."""

from __future__ import annotations

from pathlib import Path

import loralib
import pytest
import torch
from peft import PeftModel

import lora_hub
from lora_hub import CombineError
from lora_hub.testing import random_peft_adapter, tiny_model

from .factories import SPECS, random_adapter, with_loralib_qkv

TOKENS = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(3))


def _peft_dirs(tmp_path: Path, kind: str = "llama") -> list[Path]:
    """Three PEFT adapters with different ranks, alphas, target sets and scaling rules (the last one rslora)."""
    model = tiny_model(kind)
    return [
        random_peft_adapter(model, tmp_path / "a", seed=1, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
        random_peft_adapter(model, tmp_path / "b", seed=2, r=8, lora_alpha=4,
                            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj"]),
        random_peft_adapter(model, tmp_path / "c", seed=3, r=2, lora_alpha=3, use_rslora=True,
                            target_modules=["v_proj", "down_proj"]),
    ]


def _check_exact(combined: lora_hub.Adapter, sources: list[lora_hub.Adapter], weights: list[float]) -> None:
    modules = set().union(*(s.modules for s in sources))
    assert set(combined.modules) == modules
    for module in modules:
        expected = sum(w * s.delta_weight(module) for s, w in zip(sources, weights, strict=True)
                       if module in s.modules)
        torch.testing.assert_close(combined.delta_weight(module), expected, rtol=1e-5, atol=1e-6)
        assert combined.modules[module].r == sum(s.modules[module].r * s.modules[module].groups
                                                 for s in sources if module in s.modules)


@pytest.mark.parametrize("method", ["cat", "linear"])
def test_cat_and_linear_are_the_weighted_sum_of_the_updates(tmp_path: Path, method: str) -> None:
    dirs = _peft_dirs(tmp_path)
    sources = [lora_hub.convert_adapter(d) for d in dirs]
    combined = lora_hub.combine(dirs, [0.7, 0.3, -0.5], method=method)
    _check_exact(combined, sources, [0.7, 0.3, -0.5])


def test_cat_logits_equal_peft_add_weighted_adapter(tmp_path: Path) -> None:
    dirs = _peft_dirs(tmp_path)
    weights = [0.7, 0.3, 0.5]
    peft_model = PeftModel.from_pretrained(tiny_model("llama"), dirs[0], adapter_name="a")
    peft_model.load_adapter(dirs[1], adapter_name="b")
    peft_model.load_adapter(dirs[2], adapter_name="c")
    peft_model.add_weighted_adapter(["a", "b", "c"], weights, "mix", combination_type="cat")
    peft_model.set_adapter("mix")
    combined = lora_hub.combine(dirs, weights, method="cat")
    runtime = lora_hub.attach(tiny_model("llama"))
    runtime.load("mix", combined)
    runtime.use("mix")
    with torch.no_grad():
        expected = peft_model.eval()(TOKENS).logits
        actual = runtime.model(TOKENS).logits
        exported = PeftModel.from_pretrained(tiny_model("llama"),
                                             lora_hub.to_peft(combined, tmp_path / "mix")).eval()(TOKENS).logits
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(exported, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(expected, tiny_model("llama")(TOKENS).logits, atol=1e-3)


def test_enable_lora_and_fan_in_fan_out_modules_combine_exactly(base_dirs) -> None:
    oracle = with_loralib_qkv("gpt2", seed=4)
    fused = lora_hub.from_loralib(loralib.lora_state_dict(oracle), alpha=4, enable_lora=[True, False, True],
                                  base=base_dirs["gpt2"])
    plain_specs = {m: lora_hub.ModuleSpec(r=3, alpha=6, in_features=64, out_features=192, fan_in_fan_out=True)
                   for m in fused.modules}
    plain = random_adapter(5, specs=plain_specs, with_head=False)
    for method in ("cat", "linear"):
        _check_exact(lora_hub.combine([fused, plain], [1.5, -0.25], method=method, force=True), [fused, plain],
                     [1.5, -0.25])
    # A/B averaging is quadratic in the weights: w = 1/4 twice gives (2 * sqrt(1/4))^2 = 1 times the update
    same = lora_hub.combine([fused, fused], [0.25, 0.25], method="linear_ab")
    module = next(iter(fused.modules))
    assert same.modules[module].enable_lora == (True, False, True)
    torch.testing.assert_close(same.delta_weight(module), fused.delta_weight(module), rtol=1e-5, atol=1e-6)


def test_svd_at_full_rank_is_exact_and_below_it_loses_the_discarded_singular_values(tmp_path: Path) -> None:
    dirs = _peft_dirs(tmp_path)
    sources = [lora_hub.convert_adapter(d) for d in dirs]
    weights = [1.0, 0.5, 2.0]
    exact = lora_hub.combine(sources, weights, method="cat")
    full = lora_hub.combine(sources, weights, method="svd", rank=14)
    for module in exact.modules:
        torch.testing.assert_close(full.delta_weight(module), exact.delta_weight(module), rtol=1e-4, atol=1e-5)
    reports: list[lora_hub.ModuleReport] = []
    low = lora_hub.combine(sources, weights, method="svd", rank=3, on_module=reports.append)
    energies = {r.module: r.energy for r in reports}
    for module in exact.modules:
        target = exact.delta_weight(module)
        singular = torch.linalg.svdvals(target.double())
        approx = low.delta_weight(module).double()
        error = ((target.double() - approx) ** 2).sum()
        torch.testing.assert_close(error, (singular[3:] ** 2).sum(), rtol=1e-4, atol=1e-8)
        assert low.modules[module].r == min(3, exact.modules[module].r)  # never more than the update's rank
        assert energies[module] == pytest.approx(float((singular[:3] ** 2).sum() / (singular ** 2).sum()), rel=1e-5)
    assert low.config.provenance["energy"]["min"] == pytest.approx(min(energies.values()))


@pytest.mark.parametrize(("ours", "theirs", "density"), [
    ("linear_ab", "linear", None), ("ties_ab", "ties", 0.4), ("magnitude_prune_ab", "magnitude_prune", 0.6),
    ("dare_linear_ab", "dare_linear", 0.5), ("dare_ties_ab", "dare_ties", 0.3),
])
def test_ab_methods_reproduce_peft_bit_for_bit(tmp_path: Path, ours: str, theirs: str, density: float | None) -> None:
    model = tiny_model("llama")
    targets = ["q_proj", "k_proj", "v_proj", "up_proj"]
    dirs = [random_peft_adapter(model, tmp_path / f"s{i}", seed=10 + i, r=4, lora_alpha=alpha,
                                target_modules=targets) for i, alpha in enumerate((8, 4, 6))]
    weights = [0.6, -0.3, 0.9]
    peft_model = PeftModel.from_pretrained(tiny_model("llama"), dirs[0], adapter_name="s0")
    for i in (1, 2):
        peft_model.load_adapter(dirs[i], adapter_name=f"s{i}")
    # PEFT draws DARE's masks from the global generator after initialising the new adapter's layers (which draws
    # too): a probe adapter with the same config, made by a method that draws nothing else, gives that state.
    torch.manual_seed(1234)
    peft_model.add_weighted_adapter(["s0", "s1", "s2"], weights, "probe", combination_type="linear")
    generator = torch.Generator()
    generator.set_state(torch.get_rng_state())
    torch.manual_seed(1234)
    peft_model.add_weighted_adapter(["s0", "s1", "s2"], weights, "mix", combination_type=theirs, density=density,
                                    majority_sign_method="total")
    order = [name for name, _ in tiny_model("llama").named_modules()]
    combined = lora_hub.combine(dirs, weights, method=ours, density=density, seed=generator, order=order)
    layers = {name[len("base_model.model."):]: module for name, module in peft_model.named_modules()
              if hasattr(module, "lora_A") and "mix" in getattr(module, "lora_A", {})}
    assert set(layers) == set(combined.modules)
    for module, layer in layers.items():
        assert torch.equal(combined.lora_A(module), layer.lora_A["mix"].weight.data), module
        assert torch.equal(combined.lora_B(module), layer.lora_B["mix"].weight.data), module
        assert combined.modules[module].scaling == layer.scaling["mix"] == 1.0


@pytest.mark.parametrize(("ours", "theirs"), [("ties", "ties_svd"), ("magnitude_prune", "magnitude_prune_svd")])
def test_delta_space_pruning_methods_match_peft_svd_variants(tmp_path: Path, ours: str, theirs: str) -> None:
    model = tiny_model("llama")
    dirs = [random_peft_adapter(model, tmp_path / f"s{i}", seed=20 + i, r=4, target_modules=["q_proj", "o_proj"])
            for i in range(2)]
    peft_model = PeftModel.from_pretrained(tiny_model("llama"), dirs[0], adapter_name="s0")
    peft_model.load_adapter(dirs[1], adapter_name="s1")
    peft_model.add_weighted_adapter(["s0", "s1"], [1.0, 0.5], "mix", combination_type=theirs, density=0.5)
    combined = lora_hub.combine(dirs, [1.0, 0.5], method=ours, density=0.5)
    for name, layer in peft_model.named_modules():
        if hasattr(layer, "lora_A") and "mix" in layer.lora_A:
            module = name[len("base_model.model."):]
            expected = layer.lora_B["mix"].weight.data @ layer.lora_A["mix"].weight.data
            torch.testing.assert_close(combined.delta_weight(module), expected, rtol=1e-4, atol=1e-5)


def test_dare_is_deterministic_given_a_seed_and_records_it(tmp_path: Path) -> None:
    dirs = _peft_dirs(tmp_path)[:2]
    first = lora_hub.combine(dirs, [1, 1], method="dare_ties", density=0.5, seed=7)
    again = lora_hub.combine(dirs, [1, 1], method="dare_ties", density=0.5, seed=7)
    other = lora_hub.combine(dirs, [1, 1], method="dare_ties", density=0.5, seed=8)
    assert all(torch.equal(first.tensors[k], again.tensors[k]) for k in first.tensors)
    assert any(not torch.equal(first.tensors[k], other.tensors[k]) for k in first.tensors)
    unseeded = lora_hub.combine(dirs, [1, 1], method="dare_linear", density=0.5)
    seed = unseeded.config.provenance["parameters"]["seed"]
    replay = lora_hub.combine(dirs, [1, 1], method="dare_linear", density=0.5, seed=seed)
    assert all(torch.equal(unseeded.tensors[k], replay.tensors[k]) for k in replay.tensors)


def test_provenance_survives_saving_and_the_file_validates(tmp_path: Path, base_dirs) -> None:
    dirs = _peft_dirs(tmp_path)[:2]
    files = [lora_hub.save_adapter(lora_hub.convert_adapter(d, base=base_dirs["llama"]), tmp_path / f"{d.name}.st")
             for d in dirs]
    combined = lora_hub.combine(files, [0.7, 0.3], method="svd", rank=4)
    saved = lora_hub.save_adapter(combined, tmp_path / "mix.safetensors")
    loaded = lora_hub.load_adapter(saved)
    provenance = loaded.config.provenance
    assert provenance["method"] == "svd" and provenance["parameters"]["rank"] == 4
    assert [s["weight"] for s in provenance["sources"]] == [0.7, 0.3]
    assert [s["sha256"] for s in provenance["sources"]] == \
        [lora_hub.read_header(f).config.tensors_sha256 for f in files]
    assert provenance["sources"][0]["name"] == "a.st" and provenance["reference"].startswith("https://")
    report = lora_hub.validate(saved, base=base_dirs["llama"], profile="lora-hub")
    assert report.ok, report.findings
    assert lora_hub.is_canonical(lora_hub.read_header(saved))
    plain = lora_hub.save_adapter(lora_hub.convert_adapter(dirs[0]), tmp_path / "plain.safetensors")
    assert "provenance" not in lora_hub.read_header(plain).config.to_json()


def test_bad_requests_are_refused_clearly(tmp_path: Path) -> None:
    a, b = random_adapter(1, with_head=False), random_adapter(2, with_head=False)
    cases = [
        (dict(weights=[1.0]), "1 weight"),
        (dict(method="nope"), "unknown combination method"),
        (dict(method="ties", density=0.0), r"density must be in \(0, 1\]"),
        (dict(method="ties", density=1.5), r"density must be in \(0, 1\]"),
        (dict(method="ties"), "needs a density"),
        (dict(method="svd", rank=0), "rank must be an integer >= 1"),
        (dict(method="cat", rank=4), "does not take a rank"),
        (dict(method="cat", density=0.5), "does not prune"),
        (dict(weights=[1.0, float("nan")]), "finite"),
    ]
    for kwargs, message in cases:
        kwargs.setdefault("weights", [1.0, 1.0])
        with pytest.raises(CombineError, match=message):
            lora_hub.combine([a, b], **kwargs)
    wider = random_adapter(3, with_head=False, specs={m: lora_hub.ModuleSpec(r=s.r * 2, alpha=s.alpha,
                                                                               in_features=s.in_features,
                                                                               out_features=s.out_features,
                                                                               rslora=s.rslora,
                                                                               fan_in_fan_out=s.fan_in_fan_out,
                                                                               enable_lora=s.enable_lora)
                                                      for m, s in SPECS.items()})
    with pytest.raises(CombineError, match="same rank"):
        lora_hub.combine([a, wider], [1, 1], method="linear_ab")
    heads = [random_adapter(4), random_adapter(5)]
    with pytest.raises(CombineError, match="replaced"):
        lora_hub.combine(heads, [1, 1])
    with pytest.raises(lora_hub.AdapterNotFoundError):
        lora_hub.combine([a, tmp_path / "missing.safetensors"], [1, 1])


def test_different_base_models_are_refused_unless_forced(tmp_path: Path) -> None:
    llama = lora_hub.convert_adapter(random_peft_adapter(tiny_model("llama"), tmp_path / "l"))
    opt = lora_hub.convert_adapter(random_peft_adapter(tiny_model("opt"), tmp_path / "o"))
    llama = llama.with_config(base_model=lora_hub.BaseModelRef(name="org/llama", model_type="llama"))
    opt = opt.with_config(base_model=lora_hub.BaseModelRef(name="org/opt", model_type="opt"))
    with pytest.raises(lora_hub.BaseModelMismatchError, match="force"):
        lora_hub.combine([llama, opt], [1, 1])
    forced = lora_hub.combine([llama, opt], [1, 1], force=True)
    assert set(forced.modules) == set(llama.modules) | set(opt.modules)
    shapes = lora_hub.ModuleSpec(r=2, alpha=2, in_features=8, out_features=8)
    other = random_adapter(6, with_head=False, specs={"model.layers.0.self_attn.q_proj": shapes})
    with pytest.raises(CombineError, match="disagree on its shape"):
        lora_hub.combine([random_adapter(7, with_head=False), other], [1, 1], force=True)


def test_large_modules_use_a_randomized_svd_that_keeps_what_the_full_one_keeps(tmp_path: Path, monkeypatch) -> None:
    import importlib

    combine_module = importlib.import_module("lora_hub.combine")  # the attribute lora_hub.combine is the function
    dirs = _peft_dirs(tmp_path)[:2]
    full_reports: list[lora_hub.ModuleReport] = []
    full = lora_hub.combine(dirs, [1, 1], method="ties", density=0.5, rank=4, on_module=full_reports.append)
    monkeypatch.setattr(combine_module, "LOWRANK_MIN_DIM", 32)  # treat the tiny model's modules as large
    monkeypatch.setattr(combine_module, "LOWRANK_OVERSAMPLE", 24)
    reports: list[lora_hub.ModuleReport] = []
    fast = lora_hub.combine(dirs, [1, 1], method="ties", density=0.5, rank=4, on_module=reports.append)
    assert all(r.lowrank for r in reports)
    for ours, exact in zip(reports, full_reports, strict=True):
        assert ours.energy == pytest.approx(exact.energy, abs=0.01)
    for module in full.modules:
        error = (fast.delta_weight(module) - full.delta_weight(module)).norm() / full.delta_weight(module).norm()
        assert error < 0.1, module


def test_same_targets_with_different_fingerprints_are_refused(tmp_path: Path) -> None:
    source = lora_hub.convert_adapter(_peft_dirs(tmp_path)[0])
    one = source.with_config(base_model=lora_hub.BaseModelRef(fingerprint="sha256:" + "1" * 64))
    two = source.with_config(base_model=lora_hub.BaseModelRef(fingerprint="sha256:" + "2" * 64))
    with pytest.raises(lora_hub.BaseModelMismatchError, match="fingerprints"):
        lora_hub.combine([one, two], [1, 1])


@pytest.mark.slow
def test_memory_holds_one_module_at_a_time(tmp_path: Path, monkeypatch) -> None:
    """Four times the modules, about the same peak: the full deltas are made and dropped module by module. glibc
    is told to map every large block separately, so that freed tensors leave the resident set (by default it keeps
    them in a heap that fragments, which measures the allocator rather than what is alive)."""
    from benchmarks.harness import peak_memory_added

    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "131072")
    small = [lora_hub.save_adapter(random_adapter(i, with_head=False), tmp_path / f"s{i}.safetensors")
             for i in range(2)]
    warm_up = f"lora_hub.combine({[str(f) for f in small]!r}, [1, 1], method='ties', density=0.5)"  # LAPACK etc.
    peaks = {}
    for layers in (4, 16):  # the MLP projections of a hidden-512 Llama, r=4, made without building the model
        specs = {}
        for layer in range(layers):
            specs[f"model.layers.{layer}.mlp.up_proj"] = lora_hub.ModuleSpec(r=4, alpha=8, in_features=512,
                                                                             out_features=1024)
            specs[f"model.layers.{layer}.mlp.down_proj"] = lora_hub.ModuleSpec(r=4, alpha=8, in_features=1024,
                                                                               out_features=512)
        files = [str(lora_hub.save_adapter(random_adapter(i, specs=specs, with_head=False),
                                           tmp_path / f"l{layers}-{i}.safetensors")) for i in range(2)]
        peaks[layers] = peak_memory_added(f"lora_hub.combine({files!r}, [1, 1], method='ties', density=0.5)",
                                          setup=f"import torch, lora_hub\n{warm_up}")
    # Holding every full delta would add 12 layers x 2 modules x 2 adapters x 2 MB = 96 MB for the larger one.
    assert peaks[16] < peaks[4] * 1.25 + 8 * 2**20, {k: f"{v / 2**20:.1f} MB" for k, v in peaks.items()}


def _feature_dirs(tmp_path: Path, name: str, model: str = "llama", **settings) -> list[Path]:
    from tests.peft_cases import BUILDERS, peft_adapter

    return [peft_adapter(tmp_path / f"{name}{seed}", BUILDERS[model](), seed=seed, **settings) for seed in (1, 2)]


def test_embedding_modules_combine_like_peft(tmp_path: Path) -> None:
    dirs = _feature_dirs(tmp_path, "embedding", target_modules=["embed_tokens", "q_proj"])
    weights = [0.7, -0.4]
    peft_model = PeftModel.from_pretrained(tiny_model("llama"), dirs[0], adapter_name="a")
    peft_model.load_adapter(dirs[1], adapter_name="b")
    peft_model.add_weighted_adapter(["a", "b"], weights, "mix", combination_type="cat")
    peft_model.set_adapter("mix")
    for method, rank in (("cat", None), ("svd", 8)):  # svd at the sum of the ranks is exact
        combined = lora_hub.combine(dirs, weights, method=method, rank=rank)
        embedding = combined.modules["model.embed_tokens"]
        assert embedding.kind == "embedding" and embedding.replaces_base
        runtime = lora_hub.attach(tiny_model("llama"))
        runtime.load("mix", combined)
        runtime.use("mix")
        with torch.no_grad():
            torch.testing.assert_close(runtime.model(TOKENS).logits, peft_model.eval()(TOKENS).logits, rtol=1e-5,
                                       atol=1e-5)


def test_lora_bias_and_trainable_tokens_combine_as_the_stacked_sources(tmp_path: Path) -> None:
    biased = _feature_dirs(tmp_path, "bias", target_modules=["q_proj", "down_proj"], lora_bias=True)
    tokens = _feature_dirs(tmp_path, "tokens", target_modules=["v_proj"], trainable_token_indices=[3, 9])[:1]
    sources, weights = biased + tokens, [0.6, -1.3, 0.8]
    runtime = lora_hub.attach(tiny_model("llama"))
    for i, source in enumerate(sources):
        runtime.load(f"s{i}", source)
    runtime.use({f"s{i}": w for i, w in enumerate(weights)})  # the run time stacks them (each one matches PEFT)
    with torch.no_grad():
        expected = runtime.model(TOKENS).logits
    for method, rank in (("cat", None), ("linear", None), ("svd", 8)):
        combined = lora_hub.combine(sources, weights, method=method, rank=rank)
        assert combined.modules["model.layers.0.mlp.down_proj"].bias
        assert dict(combined.config.trainable_tokens) == {"model.embed_tokens": (3, 9)}
        runtime.load(method, lora_hub.load_adapter(lora_hub.save_adapter(combined, tmp_path / f"{method}.st")))
        runtime.use(method)
        with torch.no_grad():
            torch.testing.assert_close(runtime.model(TOKENS).logits, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(CombineError, match="lora_bias.*use cat, linear or svd"):
        lora_hub.combine(biased, method="ties", density=0.5)
    with pytest.raises(CombineError, match="both bring trainable tokens"):
        lora_hub.combine(_feature_dirs(tmp_path, "tokens", target_modules=["v_proj"], trainable_token_indices=[3]))


def test_dora_experts_and_different_vocabularies_are_refused_by_name(tmp_path: Path) -> None:
    with pytest.raises(CombineError, match="uses DoRA"):
        lora_hub.combine(_feature_dirs(tmp_path, "dora", target_modules=["q_proj"], use_dora=True))
    with pytest.raises(CombineError, match="expert parameters"):
        lora_hub.combine(_feature_dirs(tmp_path, "experts", "mixtral", target_modules=["q_proj"],
                                       target_parameters=["mlp.experts.down_proj"]))
    from tests.peft_cases import BUILDERS, peft_adapter

    resized = peft_adapter(tmp_path / "resized", BUILDERS["resized"](), target_modules=["embed_tokens"])
    plain = _feature_dirs(tmp_path, "embedding", target_modules=["embed_tokens"])[0]
    with pytest.raises(CombineError, match="different embedding matrices"):
        lora_hub.combine([resized, plain])


def test_adapters_that_bring_the_base_embedding_unchanged_stack_at_run_time(tmp_path: Path) -> None:
    dirs = _feature_dirs(tmp_path, "embedding", target_modules=["embed_tokens", "q_proj"])
    runtime = lora_hub.attach(tiny_model("llama"))
    runtime.load("a", dirs[0])
    runtime.load("b", dirs[1])
    runtime.use({"a": 0.7, "b": -0.4})  # PEFT saved the embedding matrix with each, unchanged: nothing to clash
    with torch.no_grad():
        stacked = runtime.model(TOKENS).logits
    runtime.load("mix", lora_hub.combine(dirs, [0.7, -0.4]))
    runtime.use("mix")
    with torch.no_grad():
        torch.testing.assert_close(runtime.model(TOKENS).logits, stacked, rtol=1e-5, atol=1e-5)
