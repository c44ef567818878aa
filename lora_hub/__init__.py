"""lora-hub: one file format for LoRA adapters, readers for the layouts people have, and the tools around them.

Importing lora_hub does not import torch; functions that work on tensors import it when they run. The run-time
names (`attach`, `AdapterRuntime`), whose module needs torch, are resolved on first use (PEP 562).
"""

from typing import TYPE_CHECKING, Any

from .adapter import Adapter as Adapter
from .adapter import AdapterConfig as AdapterConfig
from .adapter import BaseModelRef as BaseModelRef
from .adapter import ModuleSpec as ModuleSpec
from .adapter import delta_weight as delta_weight
from .adapter import dora_weight as dora_weight
from .basemodel import BaseModelInfo as BaseModelInfo
from .basemodel import LayerInfo as LayerInfo
from .basemodel import describe_base as describe_base
from .basemodel import fit_to_base as fit_to_base
from .combine import METHODS as METHODS
from .combine import ModuleReport as ModuleReport
from .combine import combine as combine
from .constants import FORMAT_VERSION as FORMAT_VERSION
from .convert import Layout as Layout
from .convert import convert_adapter as convert_adapter
from .convert import detect_layout as detect_layout
from .convert import from_gguf as from_gguf
from .convert import from_loralib as from_loralib
from .convert import from_mlx as from_mlx
from .convert import from_peft as from_peft
from .convert import to_gguf as to_gguf
from .convert import to_mlx as to_mlx
from .convert import to_peft as to_peft
from .errors import AdapterMismatchError as AdapterMismatchError
from .errors import AdapterNotFoundError as AdapterNotFoundError
from .errors import AdapterRejectedError as AdapterRejectedError
from .errors import BaseModelError as BaseModelError
from .errors import BaseModelMismatchError as BaseModelMismatchError
from .errors import BufferHoleError as BufferHoleError
from .errors import ChecksumMismatchError as ChecksumMismatchError
from .errors import ChecksumMismatchWarning as ChecksumMismatchWarning
from .errors import CombineError as CombineError
from .errors import ConfigError as ConfigError
from .errors import ConfigMissingError as ConfigMissingError
from .errors import ConversionError as ConversionError
from .errors import ExportError as ExportError
from .errors import FanInFanOutCorrectedWarning as FanInFanOutCorrectedWarning
from .errors import FeatureUnknownError as FeatureUnknownError
from .errors import FileChangedError as FileChangedError
from .errors import FileTruncatedError as FileTruncatedError
from .errors import FormatVersionError as FormatVersionError
from .errors import FormMissingError as FormMissingError
from .errors import GgufError as GgufError
from .errors import HeaderEncodingError as HeaderEncodingError
from .errors import HeaderJSONError as HeaderJSONError
from .errors import HeaderSchemaError as HeaderSchemaError
from .errors import HeaderTooLargeError as HeaderTooLargeError
from .errors import HubAccessError as HubAccessError
from .errors import HubError as HubError
from .errors import HubUnreachableError as HubUnreachableError
from .errors import InvalidAdapterError as InvalidAdapterError
from .errors import LfsPointerError as LfsPointerError
from .errors import LimitExceededError as LimitExceededError
from .errors import LoraHubError as LoraHubError
from .errors import LoraHubWarning as LoraHubWarning
from .errors import MetadataError as MetadataError
from .errors import MissingTensorError as MissingTensorError
from .errors import MlxConfigError as MlxConfigError
from .errors import ModuleConflictError as ModuleConflictError
from .errors import NotAnAdapterRepoError as NotAnAdapterRepoError
from .errors import NotCachedError as NotCachedError
from .errors import NotLoraHubFileError as NotLoraHubFileError
from .errors import OffsetOutOfRangeError as OffsetOutOfRangeError
from .errors import OffsetOverlapError as OffsetOverlapError
from .errors import ParameterRequiredError as ParameterRequiredError
from .errors import PatternTooComplexError as PatternTooComplexError
from .errors import PatternUnsupportedError as PatternUnsupportedError
from .errors import PeftConfigError as PeftConfigError
from .errors import PickleRefusedError as PickleRefusedError
from .errors import RankMismatchError as RankMismatchError
from .errors import RegistryError as RegistryError
from .errors import RegistryUnusableError as RegistryUnusableError
from .errors import RepoIdError as RepoIdError
from .errors import RepoNotFoundError as RepoNotFoundError
from .errors import RevisionNotFoundError as RevisionNotFoundError
from .errors import RuntimeStateError as RuntimeStateError
from .errors import ShapeMismatchError as ShapeMismatchError
from .errors import TensorDtypeError as TensorDtypeError
from .errors import TensorSizeError as TensorSizeError
from .errors import TooManyTensorsError as TooManyTensorsError
from .errors import UnexpectedTensorError as UnexpectedTensorError
from .errors import UnknownLayoutError as UnknownLayoutError
from .errors import UnsafePickleError as UnsafePickleError
from .errors import UnsupportedFeatureError as UnsupportedFeatureError
from .errors import UnsupportedLayoutError as UnsupportedLayoutError
from .errors import UntargetedModulesWarning as UntargetedModulesWarning
from .errors import WeightsMissingError as WeightsMissingError
from .findings import Finding as Finding
from .findings import Severity as Severity
from .findings import ValidationReport as ValidationReport
from .format import AdapterHeader as AdapterHeader
from .format import SafetensorsHeader as SafetensorsHeader
from .format import TensorInfo as TensorInfo
from .format import adapter_header as adapter_header
from .format import is_canonical as is_canonical
from .format import load_adapter as load_adapter
from .format import read_header as read_header
from .format import read_safetensors_header as read_safetensors_header
from .format import save_adapter as save_adapter
from .format import verify_checksum as verify_checksum
from .hub import PushResult as PushResult
from .hub import pull as pull
from .hub import push as push
from .registry import Registry as Registry
from .registry import RegistryEntry as RegistryEntry
from .summary import AdapterSummary as AdapterSummary
from .summary import summarize as summarize
from .validate import PROFILES as PROFILES
from .validate import validate as validate

__version__ = "0.1.0"

_RUNTIME = ("AdapterRuntime", "attach")

if TYPE_CHECKING:
    from .runtime import AdapterRuntime as AdapterRuntime
    from .runtime import attach as attach


def __getattr__(name: str) -> Any:
    if name in _RUNTIME:
        from . import runtime

        return getattr(runtime, name)
    raise AttributeError(f"module 'lora_hub' has no attribute '{name}'")

__all__ = [
    "Adapter",
    "AdapterConfig",
    "AdapterHeader",
    "AdapterMismatchError",
    "AdapterNotFoundError",
    "AdapterRejectedError",
    "AdapterRuntime",
    "AdapterSummary",
    "BaseModelError",
    "BaseModelInfo",
    "BaseModelMismatchError",
    "BaseModelRef",
    "BufferHoleError",
    "ChecksumMismatchError",
    "ChecksumMismatchWarning",
    "CombineError",
    "ConfigError",
    "ConfigMissingError",
    "ConversionError",
    "ExportError",
    "FORMAT_VERSION",
    "FanInFanOutCorrectedWarning",
    "FeatureUnknownError",
    "FileChangedError",
    "FileTruncatedError",
    "Finding",
    "FormatVersionError",
    "FormMissingError",
    "GgufError",
    "HeaderEncodingError",
    "HeaderJSONError",
    "HeaderSchemaError",
    "HeaderTooLargeError",
    "HubAccessError",
    "HubError",
    "HubUnreachableError",
    "InvalidAdapterError",
    "LayerInfo",
    "Layout",
    "LfsPointerError",
    "LimitExceededError",
    "LoraHubError",
    "LoraHubWarning",
    "METHODS",
    "MetadataError",
    "MissingTensorError",
    "MlxConfigError",
    "ModuleConflictError",
    "ModuleReport",
    "ModuleSpec",
    "NotAnAdapterRepoError",
    "NotCachedError",
    "NotLoraHubFileError",
    "OffsetOutOfRangeError",
    "OffsetOverlapError",
    "PROFILES",
    "ParameterRequiredError",
    "PatternTooComplexError",
    "PatternUnsupportedError",
    "PeftConfigError",
    "PickleRefusedError",
    "PushResult",
    "RankMismatchError",
    "Registry",
    "RegistryEntry",
    "RegistryError",
    "RegistryUnusableError",
    "RepoIdError",
    "RepoNotFoundError",
    "RevisionNotFoundError",
    "RuntimeStateError",
    "SafetensorsHeader",
    "Severity",
    "ShapeMismatchError",
    "TensorDtypeError",
    "TensorInfo",
    "TensorSizeError",
    "TooManyTensorsError",
    "UnexpectedTensorError",
    "UnknownLayoutError",
    "UnsafePickleError",
    "UnsupportedFeatureError",
    "UnsupportedLayoutError",
    "UntargetedModulesWarning",
    "ValidationReport",
    "WeightsMissingError",
    "__version__",
    "adapter_header",
    "attach",
    "combine",
    "convert_adapter",
    "delta_weight",
    "describe_base",
    "detect_layout",
    "dora_weight",
    "fit_to_base",
    "from_gguf",
    "from_loralib",
    "from_mlx",
    "from_peft",
    "is_canonical",
    "load_adapter",
    "pull",
    "push",
    "read_header",
    "read_safetensors_header",
    "save_adapter",
    "summarize",
    "to_gguf",
    "to_mlx",
    "to_peft",
    "validate",
    "verify_checksum",
]
