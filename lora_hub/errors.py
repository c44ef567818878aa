"""The LoraHubError tree: one class per failure a user can cause, each with a stable `code`.

Codes are part of the public contract (spec/FORMAT.md, "Error codes"): they never change meaning across releases.
Each class also inherits the built-in exception that fits, so `except ValueError` and `except FileNotFoundError`
keep working for callers who do not know this library.
"""

from __future__ import annotations

import os
from typing import Any


class LoraHubError(Exception):
    """Base class of every error lora-hub raises on purpose.

    Args:
        message: What failed, for which file, tensor or module, and what to do about it.
        path: The file or directory concerned, when there is one.
        module: The module concerned (its path in the base model), when there is one.
        tensor: The tensor concerned (its name in the file), when there is one.
    """

    code = "LORA_HUB_ERROR"

    def __init__(self, message: str, *, path: str | os.PathLike[str] | None = None, module: str | None = None,
                 tensor: str | None = None) -> None:
        self.path = os.fspath(path) if path is not None else None
        self.message = message
        self.module = module
        self.tensor = tensor
        super().__init__(self._text())

    def locate(self, path: str | os.PathLike[str]) -> None:
        """Names the file concerned, if no path was known when the error was raised (then re-raise it)."""
        if self.path is None:
            self.path = os.fspath(path)
            self.args = (self._text(),)

    def _text(self) -> str:
        return f"'{self.path}': {self.message}" if self.path else self.message


# --- The file format (spec/FORMAT.md) -------------------------------------------------------------------------------


class InvalidAdapterError(LoraHubError, ValueError):
    """The file breaks the lora-hub v1 format or the safetensors layout it builds on."""

    code = "INVALID_ADAPTER"


class FileTruncatedError(InvalidAdapterError):
    """The file ends before its length prefix or its declared header does."""

    code = "FILE_TRUNCATED"


class HeaderTooLargeError(InvalidAdapterError):
    """The length prefix declares a header over MAX_HEADER_BYTES."""

    code = "HEADER_TOO_LARGE"


class HeaderEncodingError(InvalidAdapterError):
    """The header is not UTF-8, contains NUL bytes, or is padded with something other than spaces."""

    code = "HEADER_ENCODING"


class HeaderJSONError(InvalidAdapterError):
    """The header is not one JSON object: a syntax error, a duplicate key, NaN, or nesting too deep."""

    code = "HEADER_JSON"


class HeaderSchemaError(InvalidAdapterError):
    """The header is JSON but not a safetensors header: a malformed tensor entry or non-string metadata."""

    code = "HEADER_SCHEMA"


class TooManyTensorsError(InvalidAdapterError):
    """The header lists more than MAX_TENSORS tensors."""

    code = "TOO_MANY_TENSORS"


class TensorDtypeError(InvalidAdapterError):
    """A tensor has an unknown dtype, or a dtype that its role does not allow."""

    code = "TENSOR_DTYPE"


class TensorSizeError(InvalidAdapterError):
    """A tensor's byte range does not hold exactly prod(shape) elements of its dtype."""

    code = "TENSOR_SIZE"


class OffsetOutOfRangeError(InvalidAdapterError):
    """A tensor's data_offsets are reversed or reach past the end of the file."""

    code = "OFFSET_OUT_OF_RANGE"


class OffsetOverlapError(InvalidAdapterError):
    """Two tensors share bytes of the buffer."""

    code = "OFFSET_OVERLAP"


class BufferHoleError(InvalidAdapterError):
    """Bytes of the buffer belong to no tensor: a gap between tensors or trailing bytes."""

    code = "BUFFER_HOLE"


class LimitExceededError(InvalidAdapterError):
    """A documented limit other than header size or tensor count is exceeded (rank, modules, name length, ndim)."""

    code = "LIMIT_EXCEEDED"


class NotLoraHubFileError(InvalidAdapterError):
    """A valid safetensors file without lora-hub metadata (a PEFT file, a model checkpoint, ...)."""

    code = "NOT_LORA_HUB"


class FormatVersionError(InvalidAdapterError):
    """The file declares a format version newer than this reader supports."""

    code = "FORMAT_VERSION"


class FeatureUnknownError(FormatVersionError):
    """The file needs a format feature this reader does not know (FORMAT.md section 4): refused by name."""

    code = "FEATURE_UNKNOWN"


class MetadataError(InvalidAdapterError):
    """A lora-hub metadata value is malformed (for example a format version that is not an integer)."""

    code = "METADATA_INVALID"


class ConfigError(InvalidAdapterError):
    """The `lora_hub.config` document is not valid JSON or breaks its schema."""

    code = "CONFIG_INVALID"


class MissingTensorError(InvalidAdapterError):
    """A tensor the config requires is absent (for example lora_A without its lora_B)."""

    code = "TENSOR_MISSING"


class UnexpectedTensorError(InvalidAdapterError):
    """A tensor that the config does not account for."""

    code = "TENSOR_UNEXPECTED"


class ShapeMismatchError(InvalidAdapterError):
    """The config contradicts the tensors: features or rank differ from the shapes stored."""

    code = "SHAPE_MISMATCH"


class RankMismatchError(InvalidAdapterError):
    """lora_A and lora_B of one module disagree with each other on the rank."""

    code = "RANK_MISMATCH"


# --- Finding and converting adapters ---------------------------------------------------------------------------------


class AdapterNotFoundError(LoraHubError, FileNotFoundError):
    """The path names nothing, or a directory without any adapter in it."""

    code = "NOT_FOUND"


class FileChangedError(LoraHubError, OSError):
    """The file was replaced or changed between reading its header and reading its tensors (not a fault of the file:
    read it again)."""

    code = "FILE_CHANGED"


class ChecksumMismatchError(LoraHubError, ValueError):
    """The tensor bytes do not match the file's recorded tensors_sha256: the file is corrupt. Nothing is written from
    it unless the caller forces it, and then what is written keeps the mismatching checksum."""

    code = "CHECKSUM_MISMATCH"


class ConversionError(LoraHubError, ValueError):
    """A foreign adapter layout could not be read into a lora-hub Adapter."""

    code = "CONVERSION_FAILED"


class UnsupportedLayoutError(ConversionError):
    """A recognised layout that lora-hub does not read (diffusers, kohya, MLX, GGUF, ...).

    Args:
        layout: The name of the layout that was recognised.
    """

    code = "LAYOUT_UNSUPPORTED"

    def __init__(self, message: str, *, layout: str, **where: Any) -> None:
        self.layout = layout
        super().__init__(message, **where)


class UnknownLayoutError(ConversionError):
    """Nothing about the file matches a LoRA layout that lora-hub knows."""

    code = "LAYOUT_UNKNOWN"


class LfsPointerError(ConversionError):
    """The file is a Git LFS pointer, not the content it points to."""

    code = "GIT_LFS_POINTER"


class PickleRefusedError(ConversionError):
    """A pickle checkpoint (.bin, .pt) was not opened because the caller did not opt in."""

    code = "PICKLE_REFUSED"


class UnsafePickleError(ConversionError):
    """A pickle checkpoint holds objects other than tensors and plain containers; it was not loaded."""

    code = "PICKLE_UNSAFE"


class WeightsMissingError(ConversionError):
    """An adapter config was found without the weights it describes."""

    code = "WEIGHTS_MISSING"


class ConfigMissingError(ConversionError):
    """Adapter weights were found without the config needed to interpret them."""

    code = "CONFIG_MISSING"


class PeftConfigError(ConversionError):
    """adapter_config.json is unreadable or contradicts the weights beside it."""

    code = "PEFT_CONFIG_INVALID"


class _NamedCode:
    """For errors whose code the raiser names (a feature, a runtime's reason): `code=` overrides the class's."""

    def __init__(self, message: str, *, code: str | None = None, **where: Any) -> None:
        if code is not None:
            self.code = code
        super().__init__(message, **where)


class UnsupportedFeatureError(_NamedCode, ConversionError):
    """The adapter uses a feature lora-hub does not carry. `code` names the feature (FEATURE_ALORA, FEATURE_CONV,
    ...; see convert/features.py), or is FEATURE_UNSUPPORTED for a kind of adapter that is not LoRA at all.

    Args:
        code: The feature's code, when there is one.
    """

    code = "FEATURE_UNSUPPORTED"


class ExportError(_NamedCode, ConversionError):
    """The adapter cannot be carried to or from a runtime's own layout (llama.cpp's GGUF, mlx-lm's folder) with the
    same result. `code` names the runtime and the reason (LLAMA_CPP_DORA, LLAMA_CPP_ARCH, MLX_TIED, ...; see
    convert/runtimes.py).

    Args:
        code: The reason's code.
    """

    code = "EXPORT_REFUSED"


class GgufError(ConversionError):
    """A GGUF file that llama.cpp would not load as a LoRA adapter: unreadable, a model rather than an adapter,
    lora_a without lora_b, a tensor that fits no layer of the base model."""

    code = "GGUF_INVALID"


class MlxConfigError(ConversionError):
    """An mlx-lm adapter folder that mlx-lm's load_adapters would refuse: adapter_config.json unreadable or missing
    a key, or tensors that its settings do not make (a module outside `keys` and `num_layers`, another rank)."""

    code = "MLX_CONFIG_INVALID"


class PatternUnsupportedError(ConversionError):
    """A regular expression from the adapter's config uses a construct without a linear-time match (backreference,
    lookaround); it is not run."""

    code = "PATTERN_UNSUPPORTED"


class PatternTooComplexError(ConversionError):
    """A regular expression from the adapter's config is over the size limit, or the config's patterns would need
    more tests than the budget allows."""

    code = "PATTERN_TOO_COMPLEX"


class ParameterRequiredError(ConversionError, TypeError):
    """The layout does not record a value the conversion needs (loralib's alpha, an ambiguous enable_lora)."""

    code = "PARAMETER_REQUIRED"


class ModuleConflictError(ConversionError):
    """One module is both a LoRA target and a module to save, in a way no loader can apply unambiguously."""

    code = "MODULE_CONFLICT"


# --- Base models -----------------------------------------------------------------------------------------------------


class BaseModelError(LoraHubError, ValueError):
    """The base model could not be described: no config.json, an unknown architecture, not in the local cache."""

    code = "BASE_MODEL_UNAVAILABLE"


class BaseModelMismatchError(LoraHubError, ValueError):
    """The adapter does not fit the base model: a module is missing, or its features differ."""

    code = "BASE_MISMATCH"


# --- Run time --------------------------------------------------------------------------------------------------------


class AdapterMismatchError(BaseModelMismatchError):
    """An adapter does not fit the live model it is being loaded into; the model was left unchanged.

    Args:
        findings: The base-tier findings that stopped the load.
    """

    code = "BASE_MISMATCH"

    def __init__(self, message: str, *, findings: list | None = None, **where: Any) -> None:
        self.findings = findings or []
        super().__init__(message, **where)


class RuntimeStateError(LoraHubError, RuntimeError):
    """An operation that the runtime's state does not allow: an unknown adapter name, switching while merged, a
    runtime already detached."""

    code = "RUNTIME_STATE"


# --- Combination -----------------------------------------------------------------------------------------------------


class CombineError(LoraHubError, ValueError):
    """A combination that is not possible: an unknown method, a weight count that does not match, a density outside
    (0, 1], a rank below 1, unequal ranks for an A/B method, adapters that disagree on a module's shape."""

    code = "COMBINE_INVALID"


# --- Hub and registry ------------------------------------------------------------------------------------------------


class HubError(LoraHubError, RuntimeError):
    """The Hub (or a Hub-compatible server) refused a request or answered with an error."""

    code = "HUB_ERROR"


class RepoIdError(HubError, ValueError):
    """A repository id that is not `namespace/name` with safe characters."""

    code = "HUB_REPO_ID_INVALID"


class RepoNotFoundError(HubError, FileNotFoundError):
    """The repository does not exist, or it is private and the token (if any) may not read it."""

    code = "HUB_REPO_NOT_FOUND"


class RevisionNotFoundError(HubError, FileNotFoundError):
    """The repository has no such branch, tag or commit."""

    code = "HUB_REVISION_NOT_FOUND"


class HubAccessError(HubError, PermissionError):
    """The token is missing, invalid, or not allowed to write there."""

    code = "HUB_ACCESS_DENIED"


class HubUnreachableError(HubError, ConnectionError):
    """The endpoint cannot be reached, or the transfer broke off, and the cache does not have what was asked."""

    code = "HUB_UNREACHABLE"


class NotCachedError(HubError, FileNotFoundError):
    """Offline (HF_HUB_OFFLINE) and the repository revision is not in the local cache."""

    code = "HUB_NOT_CACHED"


class NotAnAdapterRepoError(HubError, FileNotFoundError):
    """The repository holds no adapter_model.safetensors, adapter_model.bin or adapter_config.json."""

    code = "HUB_NOT_AN_ADAPTER"


class FormMissingError(HubError, FileNotFoundError):
    """The repository holds the adapter but not in the form asked for (GGUF, mlx-lm)."""

    code = "HUB_FORM_MISSING"


class AdapterRejectedError(HubError, ValueError):
    """Validation found errors in a pulled (or to-be-pushed) adapter; it was not registered or pushed.

    Args:
        findings: The error findings.
    """

    code = "ADAPTER_REJECTED"

    def __init__(self, message: str, *, findings: list | None = None, **where: Any) -> None:
        self.findings = findings or []
        super().__init__(message, **where)


class RegistryError(LoraHubError, LookupError):
    """A name that is not in the local registry, an entry whose file is gone, or a registry it cannot use."""

    code = "NOT_IN_REGISTRY"


class RegistryUnusableError(RegistryError):
    """The registry database cannot be used: damaged, not a database, a folder, locked for too long, or read-only
    where a change was asked for."""

    code = "REGISTRY_UNUSABLE"


class LoraHubWarning(UserWarning):
    """Something was corrected or ignored on the way, and the user should know (never a silent change)."""

    code = "LORA_HUB_WARNING"


class FanInFanOutCorrectedWarning(LoraHubWarning):
    """The source's fan_in_fan_out contradicted the base layer kind and was corrected from the layer."""

    code = "FAN_IN_FAN_OUT_IN_CONFIG"


class ChecksumMismatchWarning(LoraHubWarning):
    """A file whose bytes do not match its recorded checksum was read because the caller forced it."""

    code = "CHECKSUM_MISMATCH_FORCED"


class PeftKeyIgnoredWarning(LoraHubWarning):
    """adapter_config.json has keys lora-hub does not know; they were ignored, as PeftModel ignores them."""

    code = "PEFT_KEY_IGNORED"


class UntargetedModulesWarning(LoraHubWarning):
    """Modules have LoRA tensors that the PEFT config's target_modules does not match."""

    code = "UNTARGETED_MODULES"
