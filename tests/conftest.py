"""Shared fixtures: tiny base models saved once per session, the third-party corpus, and the spec folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from lora_hub.testing import save_tiny_model

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
