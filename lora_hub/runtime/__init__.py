"""Adapters on live models: `attach` a runtime, then load, switch, stack, route, merge and unmerge (runtime.py);
the LoRA path around each base layer (layers.py); filling a slot from a file (loading.py); modules that adapters
replace (replaced.py); exact merges and restores per weight kind (weights.py)."""

from .layers import LoraLayer as LoraLayer
from .replaced import ReplacedModule as ReplacedModule
from .runtime import AdapterRuntime as AdapterRuntime
from .runtime import attach as attach

__all__ = ["AdapterRuntime", "LoraLayer", "ReplacedModule", "attach"]
