"""Shared fixtures: tiny base models saved once per session, the third-party corpus, the spec folder, and a
Hub-compatible server (`lora-hub serve`, a subprocess on 127.0.0.1) that the real huggingface_hub client, PEFT and
transformers talk to.

huggingface_hub reads HF_ENDPOINT and HF_HOME once, when it is first imported, so they are set here, before anything
imports it: the endpoint is a port picked now for the session's server, and HF_HOME a fresh folder, so no test
touches the user's cache or reaches the network.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


HUB_PORT = _free_port()
HUB_ENDPOINT = f"http://127.0.0.1:{HUB_PORT}"
_HF_HOME = tempfile.mkdtemp(prefix="lora-hub-tests-hf-")
# Tests that call the client directly stay on plain HTTP; lora_hub.push turns Xet off by itself (tested).
os.environ.update(HF_ENDPOINT=HUB_ENDPOINT, HF_HOME=_HF_HOME, HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_XET="1",
                  HF_HUB_ETAG_TIMEOUT="5", HF_HUB_DOWNLOAD_TIMEOUT="5")
for _name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_CACHE",
              "HUGGINGFACE_HUB_CACHE", "HUGGINGFACE_CO_STAGING", "LORA_HUB_HOME"):
    os.environ.pop(_name, None)

import pytest  # noqa: E402

from lora_hub.testing import save_tiny_model  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SPEC = REPO / "spec"
CORPUS = Path(os.environ.get("LORA_HUB_CORPUS", REPO.parent / "shared" / "corpus"))


@pytest.fixture(scope="session")
def corpus() -> Path:
    """../shared/corpus (or $LORA_HUB_CORPUS); tests that need it skip cleanly when it is absent."""
    if not (CORPUS / "MANIFEST.md").is_file():
        pytest.skip(f"the third-party adapter corpus is not at {CORPUS}")
    return CORPUS


@pytest.fixture(scope="session")
def base_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A saved tiny base model folder (config.json + weights) per architecture."""
    root = tmp_path_factory.mktemp("bases")
    return {kind: save_tiny_model(kind, root / kind) for kind in ("llama", "gpt2", "bloom", "opt")}


def pytest_unconfigure(config: pytest.Config) -> None:
    shutil.rmtree(_HF_HOME, ignore_errors=True)


@pytest.fixture(autouse=True)
def registry_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Each test gets its own empty registry (LORA_HUB_HOME)."""
    home = tmp_path_factory.mktemp("registry")
    monkeypatch.setenv("LORA_HUB_HOME", str(home))
    return home


@dataclass
class Hub:
    """The session's server: its endpoint, root, and tokens (write and read-only for alice, write for bob)."""

    endpoint: str
    root: Path
    process: subprocess.Popen
    alice: str
    alice_read: str
    bob: str


def start_server(root: Path, port: int) -> subprocess.Popen:
    """`lora-hub serve --root ROOT --port PORT` in a subprocess, returned once it listens."""
    process = subprocess.Popen([sys.executable, "-c", "from lora_hub_cli.main import main; main()", "serve",
                                "--root", str(root), "--port", str(port)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    line = process.stdout.readline()
    if "serving" not in line:
        process.kill()
        raise RuntimeError(f"lora-hub serve did not start: {line}{process.stderr.read()}")
    return process


@pytest.fixture(scope="session")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hub]:
    from lora_hub.server import Store

    root = tmp_path_factory.mktemp("hub-server")
    store = Store(root)
    tokens = store.add_token("alice"), store.add_token("alice", write=False), store.add_token("bob")
    process = start_server(root, HUB_PORT)
    try:
        yield Hub(HUB_ENDPOINT, root, process, *tokens)
    finally:
        process.terminate()
        process.wait(timeout=10)
