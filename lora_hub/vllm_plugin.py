"""A vLLM LoRA resolver: vLLM asks it for an adapter by the name a request gives (`"model": "alice/sql-lora"`), and
it answers with a PEFT folder that vLLM loads, after lora-hub has found the adapter (the local registry, or the Hub
when allowed), checked it with the vllm profile against the model vLLM serves, and written it in the form vLLM reads.

Registered through vLLM's plugin entry point (`vllm.general_plugins`, name `lora_hub`), so a vLLM started with
`VLLM_ALLOW_RUNTIME_LORA_UPDATING=True` and `--enable-lora` consults it for names it does not know. Settings, read
when vLLM loads the plugin:

- `LORA_HUB_VLLM_SOURCES`: `registry` (default: names already pulled into the registry, `lora-hub pull`) or
  `registry,hub` (also pull Hub repository ids on demand; the Hub endpoint and token are huggingface_hub's,
  HF_ENDPOINT and HF_TOKEN).
- `LORA_HUB_HOME`: the registry, and `vllm/` under it for the folders handed to vLLM.

A request names an adapter, never a path: names that are not registry entries or Hub ids are not looked up on disk.
An adapter the profile rejects is not handed over; vLLM then answers that it does not exist, and the reason, with its
codes, is in the log. This module is the only one that imports vLLM, and only when vLLM loads it.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import re
from pathlib import Path
from typing import Any

logger = logging.getLogger("lora_hub.vllm")
_REVISION = re.compile(r"[A-Za-z0-9._/-]{1,128}")
SOURCES = ("registry", "hub")


def peft_folder_for_vllm(base_model_name: str, lora_name: str, *, sources: tuple[str, ...] = ("registry",),
                         home: str | os.PathLike[str] | None = None) -> Path | None:
    """The PEFT folder to hand vLLM for `lora_name`, or None when there is none to hand (not found, refused).

    Args:
        base_model_name: The model vLLM serves (its path or Hub id): the adapter is checked against it when it can
            be described, and its experts named by it.
        lora_name: A registry name, or with "hub" in `sources` a Hub repository id (optionally @revision).
        sources: Where names are looked up: "registry", and "hub" to pull repositories on demand.
        home: The registry's home (default: LORA_HUB_HOME); the folders are kept in `home/vllm/`.
    """
    from .atomicfile import atomic_folder
    from .basemodel import describe_base
    from .convert import convert_adapter, to_peft
    from .errors import BaseModelError, LoraHubError
    from .hub import is_repo_id, pull, registry_name
    from .registry import Registry
    from .validate import validate

    registry = Registry(home)
    repo_id, at, revision = lora_name.partition("@")
    if lora_name in registry and "registry" in sources:
        entry = registry.get(lora_name)
    elif "hub" in sources and is_repo_id(repo_id) and (not at or _REVISION.fullmatch(revision)):
        try:
            pull(repo_id, revision=revision or None, registry=registry)
        except LoraHubError as e:
            logger.warning("lora-hub: %s not served: [%s] %s", lora_name, e.code, e)
            return None
        entry = registry.get(registry_name(repo_id, revision or None))
    else:
        return None
    try:
        path = registry.resolve(entry.name)
        base: Any = base_model_name
        try:
            describe_base(base_model_name)
        except BaseModelError:
            base = None  # a model vLLM serves that transformers cannot describe: the adapter alone is judged
        report = validate(path, base=base, profile="vllm")
        if not report.ok:
            codes = ", ".join(f"{f.code} ({f.message})" for f in report.errors[:4])
            logger.warning("lora-hub: %s not served: vLLM would not give its result on %s: %s", lora_name,
                           base_model_name, codes)
            return None
        folder = Path(registry.home) / "vllm" / hashlib.sha256(f"{entry.sha256}:{base_model_name}".encode()
                                                               ).hexdigest()[:32]
        if not (folder / "adapter_config.json").is_file():
            with atomic_folder(folder) as staging:
                to_peft(convert_adapter(path, base=base, verify=True), staging, base=base)
        return folder
    except LoraHubError as e:
        logger.warning("lora-hub: %s not served: [%s] %s", lora_name, e.code, e)
        return None


def make_resolver(sources: tuple[str, ...] = ("registry",), home: str | os.PathLike[str] | None = None) -> Any:
    """vLLM's LoRAResolver over `peft_folder_for_vllm` (vLLM is imported here)."""
    from vllm.lora.request import LoRARequest
    from vllm.lora.resolver import LoRAResolver

    class LoraHubResolver(LoRAResolver):
        """Finds adapters in lora-hub's registry (and the Hub), checks them for vLLM, hands vLLM a PEFT folder."""

        async def resolve_lora(self, base_model_name: str, lora_name: str) -> LoRARequest | None:
            folder = await asyncio.to_thread(peft_folder_for_vllm, base_model_name, lora_name, sources=sources,
                                             home=home)
            if folder is None:
                return None
            lora_id = int.from_bytes(hashlib.sha256(lora_name.encode()).digest()[:4], "big") % (2**31 - 1) + 1
            return LoRARequest(lora_name=lora_name, lora_int_id=lora_id, lora_path=str(folder),
                               base_model_name=base_model_name)

    return LoraHubResolver()


def register() -> None:
    """vLLM's plugin entry point (`vllm.general_plugins`): registers the resolver as "lora-hub"."""
    from vllm.lora.resolver import LoRAResolverRegistry

    sources = tuple(s.strip() for s in os.environ.get("LORA_HUB_VLLM_SOURCES", "registry").split(",") if s.strip())
    unknown = [s for s in sources if s not in SOURCES]
    if unknown:
        raise ValueError(f"LORA_HUB_VLLM_SOURCES takes registry and hub, not {', '.join(unknown)}")
    LoRAResolverRegistry.register_resolver("lora-hub", make_resolver(sources))
