"""The lora-hub command line through click's runner, and the installed console script once."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from lora_hub_cli.main import cli
from safetensors.torch import load_file

import lora_hub
from lora_hub.testing import random_peft_adapter, tiny_model

from .factories import random_adapter


@pytest.fixture()
def run():
    runner = CliRunner()

    def invoke(*args: str, env: dict | None = None):
        return runner.invoke(cli, [str(a) for a in args], env=env, catch_exceptions=True)

    return invoke


@pytest.fixture(scope="module")
def peft_dir(tmp_path_factory) -> Path:
    return random_peft_adapter(tiny_model("gpt2"), tmp_path_factory.mktemp("cli") / "peft", fan_in_fan_out=True)


def test_inspect_prints_a_summary(run, tmp_path: Path) -> None:
    path = lora_hub.save_adapter(random_adapter(1), tmp_path / "a.safetensors")
    result = run("inspect", path)
    assert result.exit_code == 0, result.output
    lines = dict(line.split(None, 1) if not line.startswith(("base", "tensors sha", "modules to")) else
                 (line[:17].strip(), line[17:]) for line in result.output.splitlines())
    assert lines["layout"] == "lora-hub v1"
    assert lines["modules"].startswith("3: c_attn x1, q_proj x1, v_proj x1")
    assert "enable_lora=[True, False, True]" in result.output and "rslora" in result.output
    assert lines["modules to save"] == "score"
    assert lines["base model"] == "tiny/test (model_type llama)"


def test_inspect_json_and_modules(run, peft_dir: Path) -> None:
    result = run("inspect", peft_dir, "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["layout"] == "peft (adapter_model.safetensors, safetensors)"
    assert data["module_count"] == 8 and data["groups"][0]["fan_in_fan_out"] is True
    listed = run("inspect", peft_dir, "--modules")
    assert "transformer.h.1.mlp.c_fc  r=4 alpha=8 in=64 out=256 fan_in_fan_out" in listed.output


def test_inspect_shows_kinds_and_features(run, tmp_path: Path) -> None:
    from tests.peft_cases import BUILDERS, peft_adapter

    folder = peft_adapter(tmp_path / "features", BUILDERS["llama"](), target_modules=["lm_head", "q_proj"],
                          trainable_token_indices=[2, 3])
    result = run("inspect", folder, "--modules")
    assert result.exit_code == 0, result.output
    assert "features         trainable_tokens\n" in result.output
    assert "trainable tokens model.embed_tokens (2 rows)\n" in result.output
    assert json.loads(run("inspect", folder, "--json").output)["trainable_tokens"] == {"model.embed_tokens": 2}
    folder = peft_adapter(tmp_path / "embedding", BUILDERS["llama"](), target_modules=["embed_tokens", "q_proj"])
    result = run("inspect", folder, "--modules")
    assert "features         base_weights, embedding\n" in result.output
    assert "settings         1 x r=4 alpha=8 (scaling 2) embedding base_weights\n" in result.output
    assert "  model.embed_tokens  embedding r=4 alpha=8 in=128 out=64 replaces_base\n" in result.output
    data = json.loads(run("inspect", folder, "--json").output)
    assert sorted((g["count"], g["kind"], g["features"]) for g in data["groups"]) == [
        (1, "embedding", ["base_weights"]), (2, "linear", [])]


def test_convert_to_lora_hub_and_back_to_peft(run, peft_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "a.safetensors"
    result = run("convert", peft_dir, "-o", out)
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"wrote {out} (lora-hub): 8 modules")
    back = run("convert", out, "-o", tmp_path / "peft", "--to", "peft")
    assert back.exit_code == 0, back.output
    before = load_file(peft_dir / "adapter_model.safetensors")
    after = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before) and before.keys() == after.keys()


def test_convert_warns_about_corrections(run, peft_dir: Path, tmp_path: Path, base_dirs) -> None:
    edited = tmp_path / "edited"
    shutil.copytree(peft_dir, edited)
    config = json.loads((edited / "adapter_config.json").read_text())
    (edited / "adapter_config.json").write_text(json.dumps({**config, "fan_in_fan_out": False}))
    result = run("convert", edited, "-o", tmp_path / "a.safetensors", "--base", base_dirs["gpt2"])
    assert result.exit_code == 0, result.output
    assert "warning: fan_in_fan_out corrected for 8 module(s)" in result.output


def test_convert_loralib_with_its_parameters(run, tmp_path: Path) -> None:
    import loralib
    from safetensors.torch import save_file

    layer = loralib.MergedLinear(8, 12, r=2, lora_alpha=2, enable_lora=[True, False, True])
    save_file({f"qkv.{k}": v for k, v in layer.state_dict().items() if "lora_" in k}, tmp_path / "l.safetensors")
    missing = run("convert", tmp_path / "l.safetensors", "-o", tmp_path / "out.safetensors")
    assert missing.exit_code == 1 and "error [PARAMETER_REQUIRED]" in missing.output
    result = run("convert", tmp_path / "l.safetensors", "-o", tmp_path / "out.safetensors", "--alpha", "2",
                 "--enable-lora", "1,0,1")
    assert result.exit_code == 0, result.output
    assert lora_hub.read_header(tmp_path / "out.safetensors").config.modules["qkv"].enable_lora == (True, False,
                                                                                                      True)


@pytest.mark.parametrize("name, content, label, code", [
    ("x.safetensors", b"\xff" * 16, "invalid adapter", "HEADER_TOO_LARGE"),
    ("x.bin", b"\xff" * 16, "error", "LAYOUT_UNKNOWN"),
    ("x.bin", b"\x80\x04 a pickle", "refused", "PICKLE_REFUSED"),
    ("x.safetensors", b"version https://git-lfs.github.com/spec/v1\n", "error", "GIT_LFS_POINTER"),
])
def test_errors_print_one_line_with_their_code_and_exit_1(run, tmp_path: Path, name, content, label, code) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    result = run("inspect", path)
    assert result.exit_code == 1
    assert result.output.startswith(f"{label} [{code}]: '{path}'")
    assert len(result.output.strip().splitlines()) == 1
    assert "Traceback" not in result.output


def test_wrong_base_exits_1_and_writes_nothing(run, peft_dir: Path, tmp_path: Path, base_dirs) -> None:
    result = run("convert", peft_dir, "-o", tmp_path / "a.safetensors", "--base", base_dirs["llama"])
    assert result.exit_code == 1 and "[BASE_MISMATCH]" in result.output
    assert not (tmp_path / "a.safetensors").exists()


@pytest.mark.parametrize("args", [
    ("convert", "{peft}"),
    ("convert", "{peft}", "-o", "x.safetensors", "--enable-lora", "yes,maybe"),
    ("convert", "{peft}", "-o", "{tmp}"),
    ("frobnicate",),
])
def test_usage_errors_exit_2(run, peft_dir: Path, tmp_path: Path, args) -> None:
    result = run(*(a.format(peft=peft_dir, tmp=tmp_path) for a in args))
    assert result.exit_code == 2, result.output


@pytest.mark.parametrize("command", ["inspect", "validate", "convert"])
def test_a_name_that_is_no_path_registry_entry_or_hub_id_is_not_found(run, command: str, tmp_path: Path) -> None:
    """Commands take a path, a registry name or a Hub id (tests/test_flow.py); what is none of them is NOT_FOUND."""
    extra = ["-o", str(tmp_path / "x.safetensors")] if command == "convert" else []
    result = run(command, tmp_path / "does-not-exist.safetensors", *extra)
    assert result.exit_code == 1 and "NOT_FOUND" in result.output, result.output
    assert "neither a file or folder, nor a registry name, nor a Hub repository id" in result.output


def test_debug_shows_the_traceback(run, tmp_path: Path) -> None:
    (tmp_path / "x.safetensors").write_bytes(b"\x01")
    result = run("inspect", tmp_path / "x.safetensors", env={"LORA_HUB_DEBUG": "1"})
    assert isinstance(result.exception, lora_hub.FileTruncatedError)


def test_demo_runs_offline_and_checks_itself(run, tmp_path: Path) -> None:
    result = run("demo", "--keep", tmp_path / "demo")
    assert result.exit_code == 0, result.output
    assert "every adapter survived the round trip exactly" in result.output
    assert (tmp_path / "demo" / "sql.safetensors").is_file()
    assert "logits identical" in result.output
    assert "push chat to the embedded Hub at http://127.0.0.1:" in result.output
    assert result.output.count("equal to the pushed file") == 2
    names = [e.name for e in lora_hub.Registry(tmp_path / "demo" / "registry").list()]
    assert sorted(names) == ["demo/chat-lora", "demo/sql-lora"]
    assert lora_hub.Registry().list() == []  # the user's registry is not touched


def test_console_script_is_installed() -> None:
    executable = shutil.which("lora-hub")
    assert executable, "the lora-hub console script is not on PATH"
    result = subprocess.run([executable, "--version"], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == f"lora-hub, version {lora_hub.__version__}"


def test_validate_gives_one_verdict_per_path_and_exit_codes(run, tmp_path: Path) -> None:
    vectors = Path(__file__).parents[1] / "spec" / "vectors"
    good, bad = vectors / "valid/plain_f32.safetensors", vectors / "invalid/overlapping_tensors.safetensors"
    result = run("validate", good)
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"{good}: valid (lora-hub (plain_f32.safetensors, safetensors); header+full; "
                                    "0 errors, 0 warnings)")
    assert "  info CHECKSUM_VERIFIED: sha256 " in result.output
    both = run("validate", good, bad, tmp_path / "missing")
    assert both.exit_code == 1
    lines = both.output.splitlines()
    assert sum(line.startswith(("/", str(tmp_path))) for line in lines) == 3
    assert f"{bad}: INVALID" in both.output
    assert "  error OFFSET_OVERLAP [tensor u]: tensors t and u overlap" in both.output
    assert "  error NOT_FOUND" in both.output


def test_validate_strict_fails_on_warnings_and_json_lists_reports(run, tmp_path: Path, peft_dir: Path) -> None:
    path = lora_hub.save_adapter(random_adapter(2, with_head=False), tmp_path / "a.safetensors")
    assert run("validate", path, "--profile", "peft").exit_code == 1  # enable_lora: an error for PeftModel
    header_only = run("validate", path, "--level", "header")
    assert header_only.exit_code == 0 and "header;" in header_only.output
    edited = tmp_path / "edited"
    shutil.copytree(peft_dir, edited)
    config = json.loads((edited / "adapter_config.json").read_text())
    (edited / "adapter_config.json").write_text(json.dumps({**config, "target_modules": ["nothing"]}))
    warned = run("validate", edited)
    assert warned.exit_code == 0 and "warning UNTARGETED_MODULES" in warned.output
    assert run("validate", edited, "--strict").exit_code == 1
    data = json.loads(run("validate", edited, path, "--json").output)
    assert [r["ok"] for r in data] == [True, True]
    assert [f["code"] for f in data[0]["findings"]][0] == "UNTARGETED_MODULES"


@pytest.mark.parametrize("args", [("validate",), ("validate", "x", "--level", "deep"),
                                  ("validate", "x", "--profile", "tgi")])
def test_validate_usage_errors_exit_2(run, args) -> None:
    assert run(*args).exit_code == 2


@pytest.fixture(scope="module")
def llama_adapter(tmp_path_factory, base_dirs) -> Path:
    """A lora-hub file that declares its base: the tiny Llama folder, which has a tokenizer."""
    folder = tmp_path_factory.mktemp("apply")
    source = random_peft_adapter(tiny_model("llama"), folder / "peft", seed=9)
    return lora_hub.save_adapter(lora_hub.convert_adapter(source, base=base_dirs["llama"]), folder / "a.safetensors")


def test_apply_generates_with_the_adapter(run, llama_adapter: Path) -> None:
    from lora_hub.runtime.apply import generate, open_with_adapter

    result = run("apply", llama_adapter, "--prompt", "Hello", "--max-new-tokens", "6")
    assert result.exit_code == 0, result.output
    expected = generate(open_with_adapter(llama_adapter), "Hello", max_new_tokens=6)
    assert result.stdout.strip() == expected.strip()
    assert "14 layers adapted" in result.stderr


@pytest.mark.parametrize("eight_bit", [False, True])
def test_apply_saves_the_merged_model(run, llama_adapter: Path, tmp_path: Path, eight_bit: bool) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lora_hub.runtime.apply import open_with_adapter

    args = ["apply", llama_adapter, "--merge", "--output", tmp_path / "merged"] + (["--load-in-8bit"] if eight_bit
                                                                                   else [])
    result = run(*args)
    assert result.exit_code == 0, result.output
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", device_map="cpu").eval()
    assert AutoTokenizer.from_pretrained(tmp_path / "merged").decode([42]) == "H"
    applied = open_with_adapter(llama_adapter, load_in_8bit=eight_bit)
    applied.runtime.merge()
    tokens = torch.randint(0, 97, (1, 7))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(tokens).logits, applied.model(tokens).logits, rtol=1e-4, atol=1e-4)


def test_apply_errors(run, tmp_path: Path, base_dirs) -> None:
    elsewhere = lora_hub.save_adapter(random_adapter(3, with_head=False), tmp_path / "u.safetensors")
    result = run("apply", elsewhere)  # declares the Hub model tiny/test, fetched from an endpoint that is down
    assert result.exit_code == 1 and "[HUB_UNREACHABLE]" in result.output and "tiny/test" in result.output
    source = random_peft_adapter(tiny_model("llama"), tmp_path / "peft")
    wrong = run("apply", source, "--base", base_dirs["opt"])
    assert wrong.exit_code == 1 and "[BASE_MISMATCH]" in wrong.output


def test_push_pull_list_apply_rm_against_the_server(run, hub, llama_adapter: Path, tmp_path: Path) -> None:
    from .conftest import Hub

    assert isinstance(hub, Hub)
    env = {"HF_TOKEN": hub.alice}
    pushed = run("push", llama_adapter, "alice/cli-adapter", "--private", "-m", "from the CLI", env=env)
    assert pushed.exit_code == 0, pushed.output
    assert f"{hub.endpoint}/alice/cli-adapter" in pushed.stdout and hub.alice not in pushed.output

    nothing = run("apply", "--prompt", "Hello")
    assert nothing.exit_code == 1 and "[NOT_IN_REGISTRY]" in nothing.output and "pull" in nothing.output
    private = run("pull", "alice/cli-adapter")
    assert private.exit_code == 1 and "[HUB_REPO_NOT_FOUND]" in private.output
    pulled = run("pull", "alice/cli-adapter", env=env)
    assert pulled.exit_code == 0, pulled.output
    path = Path(pulled.stdout.strip().splitlines()[-1])
    assert path.read_bytes() == llama_adapter.read_bytes()
    assert "alice/cli-adapter @ " in pulled.stdout and "rank 4" in pulled.stdout

    listed = run("list")
    assert listed.exit_code == 0 and listed.stdout.splitlines()[1].startswith("alice/cli-adapter ")
    as_json = json.loads(run("list", "--json").stdout)
    assert [e["name"] for e in as_json] == ["alice/cli-adapter"] and as_json[0]["path"] == str(path)

    from lora_hub.runtime.apply import generate, open_with_adapter

    applied = run("apply", "--prompt", "Hello", "--max-new-tokens", "5")
    assert applied.exit_code == 0, applied.output
    assert "using alice/cli-adapter" in applied.stderr
    assert applied.stdout.strip() == generate(open_with_adapter(llama_adapter), "Hello", max_new_tokens=5).strip()

    removed = run("rm", "alice/cli-adapter", "--cache")
    assert removed.exit_code == 0 and "cached files" in removed.stdout
    assert not path.exists() and run("list").stdout.startswith("no adapters")
    again = run("rm", "alice/cli-adapter")
    assert again.exit_code == 1 and "[NOT_IN_REGISTRY]" in again.output


def test_merge_combines_and_reports(run, tmp_path: Path) -> None:
    model = tiny_model("llama")
    a = random_peft_adapter(model, tmp_path / "sql", seed=1, r=4)
    b = random_peft_adapter(model, tmp_path / "chat", seed=2, r=8)
    out = tmp_path / "mix.safetensors"
    result = run("merge", a, b, "--weights", "0.7,0.3", "--method", "svd", "--rank", "4", "-o", out)
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(f"svd: sql x 0.7, chat x 0.3 -> {out}")
    assert "14 modules (14 in more than one adapter), rank 4" in result.stdout
    assert "energy kept by the SVD: mean" in result.stdout
    expected = lora_hub.combine([a, b], [0.7, 0.3], method="svd", rank=4)
    written = lora_hub.load_adapter(out)
    assert all(torch.equal(written.tensors[k], expected.tensors[k]) for k in expected.tensors)
    assert written.config.provenance["sources"][1] == {"name": "chat", "weight": 0.3,
                                                       "sha256": expected.config.provenance["sources"][1]["sha256"]}

    seeded = run("merge", a, b, "--method", "dare_linear", "--density", "0.5", "--seed", "3", "-o", out)
    assert seeded.exit_code == 0 and "seed 3" in seeded.stdout


@pytest.mark.parametrize(("args", "message"), [
    (["--weights", "0.7"], "[COMBINE_INVALID]: 1 weight(s) for 2 adapter(s)"),
    (["--method", "ties", "--density", "1.5"], "[COMBINE_INVALID]: density must be in (0, 1]"),
    (["--method", "ties", "--density", "0"], "[COMBINE_INVALID]: density must be in (0, 1]"),
    (["--method", "svd", "--rank", "0"], "[COMBINE_INVALID]: rank must be an integer >= 1"),
    (["--method", "bogus"], "[COMBINE_INVALID]: unknown combination method 'bogus'"),
])
def test_merge_refuses_bad_input_and_writes_nothing(run, tmp_path: Path, args: list[str], message: str) -> None:
    a = lora_hub.save_adapter(random_adapter(1, with_head=False), tmp_path / "a.safetensors")
    b = lora_hub.save_adapter(random_adapter(2, with_head=False), tmp_path / "b.safetensors")
    result = run("merge", a, b, *args, "-o", tmp_path / "out.safetensors")
    assert result.exit_code == 1 and message in result.output, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors", "b.safetensors"]


def test_merge_refuses_non_adapters_and_mismatched_bases(run, tmp_path: Path) -> None:
    a = lora_hub.save_adapter(random_adapter(1, with_head=False), tmp_path / "a.safetensors")
    text = tmp_path / "notes.txt"
    text.write_text("not an adapter")
    result = run("merge", a, text, "-o", tmp_path / "out.safetensors")
    assert result.exit_code == 1 and "notes.txt" in result.output
    other = random_adapter(2, with_head=False)
    other = other.with_config(base_model=lora_hub.BaseModelRef(name="tiny/other", model_type="llama"))
    b = lora_hub.save_adapter(other, tmp_path / "b.safetensors")
    mismatch = run("merge", a, b, "-o", tmp_path / "out.safetensors")
    assert mismatch.exit_code == 1 and "[BASE_MISMATCH]" in mismatch.output and "--force" in mismatch.output
    assert not (tmp_path / "out.safetensors").exists()
    assert run("merge", a, b, "--force", "-o", tmp_path / "out.safetensors").exit_code == 0


def test_control_characters_from_files_are_escaped_on_the_terminal(run, tmp_path: Path) -> None:
    hostile = "\x1b]0;pwned\x07\x1b[2J\rfake line\u202eevil"
    adapter = random_adapter(1).with_config(description=hostile, name="n\x1b[31mred")
    path = lora_hub.save_adapter(adapter, tmp_path / "a.safetensors")
    result = run("inspect", path)
    assert result.exit_code == 0, result.output
    assert "\x1b" not in result.output and "\r" not in result.output and "\u202e" not in result.output
    assert "\\x1b]0;pwned\\x07\\x1b[2J\\x0dfake line\\u202eevil" in result.output
    weird = tmp_path / "weird"
    weird.mkdir()
    from safetensors.torch import save_file

    save_file({"base_model.model.x\x1b[2J.lora_A.weight": torch.ones(2, 2)}, weird / "adapter_model.safetensors")
    (weird / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 2, "lora_alpha": 2}')
    for args in (["validate", weird], ["inspect", weird], ["convert", weird, "-o", tmp_path / "o.safetensors"]):
        result = run(*args)
        assert result.exit_code == 1 and "\x1b" not in result.output and "\\x1b" in result.output, result.output


def test_push_with_gguf_and_mlx_then_pull_each_form(run, hub, llama_adapter: Path, base_dirs) -> None:
    env = {"HF_TOKEN": hub.alice}
    pushed = run("push", llama_adapter, "alice/cli-forms", "--with", "gguf,mlx", "--base", base_dirs["llama"],
                 env=env)
    assert pushed.exit_code == 0, pushed.output
    for form, name in (("gguf", "adapter.gguf"), ("mlx", "mlx")):
        pulled = run("pull", "alice/cli-forms", "--form", form, env=env)
        assert pulled.exit_code == 0, pulled.output
        assert Path(pulled.stdout.strip().splitlines()[-1]).name == name
    wrong = run("push", llama_adapter, "alice/cli-forms", "--with", "onnx", env=env)
    assert wrong.exit_code == 2 and "the forms are gguf and mlx" in wrong.output
