"""The numbers and names that spec/FORMAT.md fixes: format version, metadata keys, tensor naming, dtypes and limits.

Every limit here is normative (FORMAT.md, "Limits"): a conforming reader refuses a file over any of them before it
reads anything large, and a conforming writer never produces one.
"""

from __future__ import annotations

FORMAT_VERSION = 2
"""The newest lora-hub format version this library reads and writes. Files that need no feature are written as
version 1, byte for byte as before; files that do are version 2 and list their features."""

METADATA_FORMAT = "format"
METADATA_FORMAT_VERSION = "lora_hub.format_version"
METADATA_CONFIG = "lora_hub.config"
METADATA_FEATURES = "lora_hub.features"
"""Version 2: the features the file needs, comma-separated, sorted; a reader refuses a file that lists one it does
not know."""

TENSOR_PREFIX = "base_model.model."
"""Every tensor name starts with this, as in PEFT's adapter_model.safetensors."""
LORA_A_SUFFIX = ".lora_A.weight"
LORA_B_SUFFIX = ".lora_B.weight"

# safetensors dtype name -> (item size in bytes, torch dtype attribute name)
DTYPES: dict[str, tuple[int, str]] = {
    "F64": (8, "float64"),
    "F32": (4, "float32"),
    "F16": (2, "float16"),
    "BF16": (2, "bfloat16"),
    "F8_E4M3": (1, "float8_e4m3fn"),
    "F8_E5M2": (1, "float8_e5m2"),
    "I64": (8, "int64"),
    "I32": (4, "int32"),
    "I16": (2, "int16"),
    "I8": (1, "int8"),
    "U64": (8, "uint64"),
    "U32": (4, "uint32"),
    "U16": (2, "uint16"),
    "U8": (1, "uint8"),
    "BOOL": (1, "bool"),
}
LORA_DTYPES = frozenset({"F64", "F32", "F16", "BF16"})
"""dtypes allowed for lora_A and lora_B; replacement tensors may use any of DTYPES."""

# Limits (FORMAT.md, "Limits").
MAX_HEADER_BYTES = 64 * 1024 * 1024
"""Largest header (the JSON after the 8-byte length prefix, padding included)."""
MAX_CONFIG_BYTES = 32 * 1024 * 1024
"""Largest `lora_hub.config` metadata value, in UTF-8 bytes."""
MAX_TENSORS = 262_144
MAX_MODULES = 131_072
MAX_RANK = 16_384
MAX_EXPERTS = 4_096
"""Most experts of an `experts` module."""
MAX_TOKENS = 1_048_576
"""Most token indices of one trainable-tokens entry."""
MAX_SCALING = 65_504.0
"""Largest scaling (alpha / r, or alpha / sqrt(r)) a module may have: the largest finite float16, so the scaled
update can be computed in any floating dtype a base model uses."""
MAX_NDIM = 8
MAX_NAME_BYTES = 1_024
"""Longest tensor or module name, in UTF-8 bytes."""
MAX_JSON_INT = 2**53 - 1
"""Largest shape entry or offset: integers above it are not exact in every JSON implementation."""
MAX_HEADER_OBJECTS = MAX_TENSORS + MAX_MODULES + 2
"""Most '{' bytes a header may hold, counted before it is parsed: one per tensor entry, one per module entry of the
config (inside its JSON string), the header itself and __metadata__. A header of a million tiny tensors is refused
before the JSON parser allocates anything for it."""
MAX_PEFT_CONFIG_BYTES = 16 * 1024 * 1024
"""Largest adapter_config.json that the PEFT reader will parse."""
