"""Many adapters on one model: a resident budget with least-recently-used eviction, loads on demand by registry name,
a host tier that reloads evicted adapters without reading a file, and threads loading, evicting and serving at once.
The oracle: every forward gives the logits the adapter gives when it is loaded once (and PeftModel's, for some)."""

from __future__ import annotations

import random
import threading
from pathlib import Path

import pytest
import torch
from peft import PeftModel

import lora_hub
from lora_hub.registry import Registry, RegistryEntry
from lora_hub.testing import random_peft_adapter, tiny_model

from .factories import counting_compile

INPUT = torch.tensor([[1, 5, 9, 2, 7]])
COUNT = 120


@pytest.fixture(scope="module")
def library(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """COUNT lora-hub files for the tiny Llama (two PEFT-made, the rest with fresh random factors and ranks 2-8)."""
    root = tmp_path_factory.mktemp("library")
    model = tiny_model("llama")
    first = lora_hub.convert_adapter(random_peft_adapter(model, root / "peft-0", seed=0), base=model)
    files = {"team/a-0": lora_hub.save_adapter(first, root / "a-0.safetensors")}
    for i in range(1, COUNT):
        generator = torch.Generator().manual_seed(i)
        r = 2 + i % 7
        modules = {m: lora_hub.ModuleSpec(r=r, alpha=2 * r, in_features=s.in_features, out_features=s.out_features)
                   for m, s in first.modules.items() if i % 3 or "mlp" not in m}
        config = lora_hub.AdapterConfig(modules=modules, base_model=lora_hub.BaseModelRef(model_type="llama"))
        tensors = {}
        for module, spec in modules.items():
            a, b = config.lora_tensor_names(module)
            tensors[a] = torch.randn(*spec.a_shape, generator=generator) * 0.3
            tensors[b] = torch.randn(*spec.b_shape, generator=generator) * 0.3
        files[f"team/a-{i}"] = lora_hub.save_adapter(lora_hub.Adapter(config, tensors), root / f"a-{i}.safetensors")
    return files


@pytest.fixture(scope="module")
def expected(library: dict[str, Path]) -> dict[str, torch.Tensor]:
    """Each adapter's logits, loaded once into a runtime without a budget."""
    model = tiny_model("llama")
    runtime = lora_hub.attach(model)
    out = {}
    with torch.no_grad():
        for name, path in library.items():
            runtime.load(name, path)
            runtime.use(name)
            out[name] = model(INPUT).logits
            runtime.unload(name)
    return out


def _register(library: dict[str, Path]) -> None:
    registry = Registry()
    for name, path in library.items():
        registry.record(RegistryEntry(name=name, path=str(path)))


def test_on_demand_loads_and_evictions_give_the_logits_of_one_load(library, expected) -> None:
    _register(library)
    model = tiny_model("llama")
    runtime = lora_hub.attach(model, max_resident=8)
    rng = random.Random(0)
    order = [f"team/a-{rng.randrange(COUNT)}" for _ in range(400)]
    with torch.no_grad():
        for name in order:
            runtime.use(name)  # a registry name: loaded on demand, the least recently used evicted
            assert torch.allclose(model(INPUT).logits, expected[name], atol=1e-5), name  # zero-padded ranks
            assert len(runtime.adapters) <= 8
    assert runtime.layers["model.layers.0.self_attn.q_proj"].slots == 8  # the slots never grew
    with torch.no_grad():
        theirs = PeftModel.from_pretrained(tiny_model("llama"), library["team/a-0"].parent / "peft-0").eval()
        runtime.use("team/a-0")
        assert torch.allclose(model(INPUT).logits, theirs(INPUT).logits, atol=1e-5)


def test_route_loads_on_demand_and_groups_within_the_budget(library, expected) -> None:
    _register(library)
    model = tiny_model("llama")
    runtime = lora_hub.attach(model, max_resident=4)
    names = ["team/a-3", None, "team/a-7", "team/a-3", "team/a-11", "team/a-13"]
    batch = INPUT.repeat(len(names), 1)
    with torch.no_grad(), runtime.route(names):
        logits = model(batch).logits
        with pytest.raises(lora_hub.RuntimeStateError, match="needed"):
            runtime.load("team/a-20", library["team/a-20"])  # all four slots held by the route
    base = tiny_model("llama")(INPUT).logits
    for row, name in enumerate(names):
        assert torch.allclose(logits[row], (expected[name] if name else base)[0], atol=1e-5), row
    with pytest.raises(lora_hub.RuntimeStateError, match="over max_resident=4"):
        with runtime.route([f"team/a-{i}" for i in range(5)]):
            pass


def test_what_is_in_use_is_never_evicted(library) -> None:
    runtime = lora_hub.attach(tiny_model("llama"), max_resident=3)
    runtime.load("kept", library["team/a-1"])
    runtime.use("kept")
    for i in range(2, 12):
        runtime.load(f"other-{i}", library[f"team/a-{i}"])
    assert "kept" in runtime.adapters and runtime.active == {"kept": 1.0} and len(runtime.adapters) == 3
    runtime.merge()
    with pytest.raises(lora_hub.RuntimeStateError, match="unmerge"):
        runtime.load("more", library["team/a-30"])
    runtime.unmerge()
    with runtime.using({"kept": 0.5, "other-10": 0.25, "other-11": 0.25}):
        with pytest.raises(lora_hub.RuntimeStateError, match="needed"):
            runtime.load("more", library["team/a-30"])
    runtime.unload("other-11")
    with pytest.raises(lora_hub.RuntimeStateError, match="no adapter 'other-11'"):
        runtime.use("other-11")  # unloaded is forgotten (evicted is not)
    with pytest.raises(ValueError, match="not both"):
        lora_hub.attach(tiny_model("llama"), max_resident=2, max_adapters=3)


def test_the_host_tier_reloads_evicted_adapters_without_reading_a_file(library, expected, tmp_path) -> None:
    copies = {}
    for i in range(6):
        copies[f"h-{i}"] = Path(tmp_path / f"h-{i}.safetensors")
        copies[f"h-{i}"].write_bytes(library[f"team/a-{i}"].read_bytes())
    model = tiny_model("llama")
    cold = lora_hub.attach(tiny_model("llama"), max_resident=2)
    runtime = lora_hub.attach(model, max_resident=2, host_cache_bytes=64 * 1024 * 1024)
    for name, path in copies.items():
        runtime.load(name, path)
        cold.load(name, path)
    for path in copies.values():
        path.unlink()  # from now on, only the host tier has the evicted ones
    with torch.no_grad():
        for i in (0, 3, 1, 5, 0):
            runtime.use(f"h-{i}")
            assert torch.allclose(model(INPUT).logits, expected[f"team/a-{i}"], atol=1e-5)
    with pytest.raises(lora_hub.AdapterNotFoundError):
        cold.use("h-0")  # without a host tier the file is needed again
    small = lora_hub.attach(tiny_model("llama"), max_resident=1, host_cache_bytes=1)
    small.load("x", library["team/a-1"])  # larger than the tier: loaded, not kept
    assert len(small._host) == 0


def test_threads_load_evict_and_serve_without_a_wrong_logit(library, expected) -> None:
    _register(library)
    model = tiny_model("llama")
    runtime = lora_hub.attach(model, max_resident=4, host_cache_bytes=32 * 1024 * 1024)
    names = [f"team/a-{i}" for i in range(16)]
    failures: list[str] = []

    def serve(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(40):
            name = rng.choice(names)
            with torch.no_grad(), runtime.serving(name):
                if not torch.allclose(model(INPUT).logits, expected[name], atol=1e-5):
                    failures.append(name)

    def load(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(40):
            name = rng.choice(names)
            try:
                runtime.load(name, library[name])  # reads outside the lock, writes a slot under it
            except lora_hub.RuntimeStateError:
                pass  # every slot needed by the servers at that moment: a refusal, never a corrupt slot

    threads = [threading.Thread(target=serve, args=(i,)) for i in range(4)]
    threads += [threading.Thread(target=load, args=(100 + i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not failures and not any(t.is_alive() for t in threads)
    assert len(runtime.adapters) <= 4


def test_on_demand_loads_and_evictions_within_a_fixed_budget_never_recompile(library, expected) -> None:
    """The compile-safety guarantee within a budget: with the targets and rank fixed, loads on demand and evictions
    write into the same buffers, and a compiled model keeps its one graph."""
    _register(library)
    model = tiny_model("llama")
    runtime = lora_hub.attach(model, targets=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                              "down_proj"], max_resident=3, max_rank=8)
    runtime.use("team/a-1")
    pointers = {n: (x.lora_A.data_ptr(), x.lora_B.data_ptr()) for n, x in runtime.layers.items()}
    compiled, compiles = counting_compile(model)
    with torch.no_grad():
        for i in (1, 2, 4, 5, 7, 1, 6, 8, 2):  # ranks 3-8 (6: no MLP modules), loaded on demand, LRU evicted
            runtime.use(f"team/a-{i}")
            assert torch.allclose(compiled(INPUT).logits, expected[f"team/a-{i}"], atol=1e-5), i
    assert len(compiles) == 1, f"{len(compiles)} compilations"
    assert pointers == {n: (x.lora_A.data_ptr(), x.lora_B.data_ptr()) for n, x in runtime.layers.items()}
