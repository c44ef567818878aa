"""Opening a base model with an adapter on it, as `lora-hub apply` does: the base is the one the adapter declares
(a local folder, or a Hub id, fetched into the Hugging Face cache when it is not there) unless another is given, full
precision or 8-bit, placed by accelerate on whatever devices there are."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from ..adapter import Adapter
from ..basemodel import TASK_AUTO_CLASSES
from ..errors import BaseModelError
from .runtime import AdapterRuntime, attach


@dataclass
class Applied:
    """A base model with an adapter in use: the model, its runtime, its tokenizer (if the base has one)."""

    model: Any
    runtime: AdapterRuntime
    tokenizer: Any
    base: str
    name: str


def open_with_adapter(source: str | os.PathLike[str] | Adapter, *, base: str | None = None,
                      load_in_8bit: bool = False, name: str = "adapter", allow_pickle: bool = False,
                      **convert_options: Any) -> Applied:
    """Loads the base model, attaches a runtime, loads the adapter and uses it.

    Args:
        source: The adapter (any layout `convert_adapter` reads), a registry name, or a Hub repo id.
        base: The base model folder or Hub id; by default the adapter's declared base model. A Hub id is fetched
            into the Hugging Face cache when needed (`lora_hub.hub.fetch_base`: the config, safetensors weights and
            tokenizer; HF_HUB_OFFLINE=1 uses the cache alone).
        load_in_8bit: Load the base with bitsandbytes LLM.int8().

    Raises:
        BaseModelError: No base given or declared, or it is neither a local folder nor a Hub id.
        RepoNotFoundError, HubUnreachableError, NotCachedError: The base model could not be fetched.
        AdapterMismatchError: The adapter does not fit the base.
    """
    from ..convert import convert_adapter
    from ..hub import locate

    if base is not None:  # names what a GGUF adapter needs mapped back, the order of expert parameters, ...
        convert_options = {"reference_base": base, **convert_options}
    adapter = source if isinstance(source, Adapter) else convert_adapter(locate(source), allow_pickle=allow_pickle,
                                                                         **convert_options)
    from ..hub import base_folder

    declared = adapter.config.base_model.name if adapter.config.base_model else None
    base = base or declared
    if not base:
        raise BaseModelError("the adapter declares no base model: give one (--base)")
    folder = base_folder(base)
    model = load_base(folder, task_type=adapter.config.task_type, load_in_8bit=load_in_8bit)
    runtime = attach(model)
    runtime.load(name, adapter)
    runtime.use(name)
    return Applied(model, runtime, _tokenizer(folder), base, name)


def load_base(base: str | os.PathLike[str], *, task_type: str | None = None, load_in_8bit: bool = False) -> Any:
    """A transformers model from a local folder or the local Hub cache (never downloaded here: `base_folder`
    fetches), in eval mode."""
    import transformers

    cls = getattr(transformers, TASK_AUTO_CLASSES.get(task_type, "AutoModelForCausalLM"))
    options: dict[str, Any] = {"local_files_only": True, "device_map": "auto",
                               "adapter_kwargs": {"local_files_only": True}}  # else a Hub lookup for a PEFT config
    if load_in_8bit:
        options["quantization_config"] = transformers.BitsAndBytesConfig(load_in_8bit=True)
    try:
        return cls.from_pretrained(base, **options).eval()
    except OSError as e:
        raise BaseModelError(f"cannot open the base model: {e}. Give a local model folder, or a Hub id whose "
                             "files are already in the local cache (nothing is downloaded); another base can be given "
                             "with base= (CLI: --base)", path=base) from e


def generate(applied: Applied, prompt: str, *, max_new_tokens: int = 64) -> str:
    """Greedy generation from `prompt`; returns the new text only.

    Raises:
        BaseModelError: The base model has no tokenizer.
    """
    import torch

    if applied.tokenizer is None:
        raise BaseModelError("the base model has no tokenizer to encode the prompt with", path=applied.base)
    inputs = applied.tokenizer(prompt, return_tensors="pt").to(applied.model.device)
    with torch.no_grad():
        output = applied.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                        pad_token_id=applied.tokenizer.pad_token_id or applied.tokenizer.eos_token_id)
    return applied.tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def _tokenizer(base: str | os.PathLike[str]) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(base, local_files_only=True)
    except (OSError, ValueError, TypeError):
        return None
