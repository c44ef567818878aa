"""The catalogue of finding codes (stable across releases; spec/CODES.md is generated from it), and the records a
validation returns: `Finding` and `ValidationReport`.

Every error class of lora_hub.errors has its code here, so a failure to read a file becomes a finding with the
same code; the validator adds the codes of what it checks beyond readability.
"""

from __future__ import annotations

import enum
import json
from dataclasses import asdict, dataclass, field
from typing import Any

from .convert.features import REFUSALS


class Severity(str, enum.Enum):
    ERROR = "error"
    WARNING = "warning"
    INFO = "info"


@dataclass(frozen=True)
class Code:
    """One entry of the catalogue: the severity a finding of this code always has, what it means, and the fix."""

    severity: Severity
    meaning: str
    fix: str


ERR, WARN, INFO = Severity.ERROR, Severity.WARNING, Severity.INFO

CATALOGUE: dict[str, Code] = {
    # Reading: the format (spec/FORMAT.md, section 14)
    "FILE_TRUNCATED": Code(ERR, "The file ends inside its length prefix or its header.", "Re-download or re-save it."),
    "HEADER_TOO_LARGE": Code(ERR, "The length prefix declares a header over 64 MiB.",
                             "The file is corrupt or not a safetensors file."),
    "HEADER_ENCODING": Code(ERR, "The header has NUL bytes, invalid UTF-8, or padding other than spaces.",
                            "Re-save it with a conforming writer."),
    "HEADER_JSON": Code(ERR, "The header is not one strict JSON object (syntax, duplicate keys, NaN, deep nesting).",
                        "Re-save it with a conforming writer."),
    "HEADER_SCHEMA": Code(ERR, "A tensor entry or __metadata__ is malformed.", "Re-save it with a conforming writer."),
    "TOO_MANY_TENSORS": Code(ERR, "The header lists more tensors than the format allows.",
                             "Split the adapter; the file may be hostile."),
    "TENSOR_DTYPE": Code(ERR, "A tensor has an unknown dtype, or a LoRA factor is not a float.",
                         "Store lora_A and lora_B as F32, F16, BF16 or F64."),
    "TENSOR_SIZE": Code(ERR, "A tensor's byte range does not hold its shape.", "The file is corrupt."),
    "OFFSET_OUT_OF_RANGE": Code(ERR, "A tensor's byte range is reversed or reaches past the end of the file.",
                                "The file is truncated or corrupt: re-download it."),
    "OFFSET_OVERLAP": Code(ERR, "Two tensors share bytes.", "The file is corrupt or hostile."),
    "BUFFER_HOLE": Code(ERR, "Bytes of the buffer belong to no tensor.", "The file is corrupt or hides data."),
    "LIMIT_EXCEEDED": Code(ERR, "A name, dimension count or config is over its documented limit.",
                           "See spec/FORMAT.md, section 13."),
    "NOT_LORA_HUB": Code(ERR, "The file is not a lora-hub file (no lora_hub.format_version).",
                         "Convert it: lora-hub convert SOURCE -o OUT.safetensors."),
    "FORMAT_VERSION": Code(ERR, "The file is from a newer format version.", "Upgrade lora-hub."),
    "FEATURE_UNKNOWN": Code(ERR, "The file needs a format feature this version of lora-hub does not know.",
                            "Upgrade lora-hub."),
    "METADATA_INVALID": Code(ERR, "The format version is malformed, or lora_hub.config is missing.",
                             "Re-save it with a conforming writer."),
    "CONFIG_INVALID": Code(ERR, "The lora_hub.config document breaks its schema.", "Fix the config; see FORMAT.md 6."),
    "TENSOR_MISSING": Code(ERR, "A tensor the config requires is absent (lora_A without lora_B, say).",
                           "The file is incomplete: re-export the adapter."),
    "TENSOR_UNEXPECTED": Code(ERR, "A tensor that the config does not account for.",
                              "List its module in modules_to_save, or drop the tensor."),
    "RANK_MISMATCH": Code(ERR, "lora_A and lora_B of one module disagree on the rank.", "The tensors are corrupt."),
    "SHAPE_MISMATCH": Code(ERR, "The config contradicts the tensor shapes.", "Fix r, the features or enable_lora."),
    # Reading: sources and conversion
    "NOT_FOUND": Code(ERR, "Nothing at the path, or a folder with no adapter in it.", "Check the path."),
    "FILE_CHANGED": Code(ERR, "The file was replaced or changed after its header was read.",
                         "Read it again; do not change a file while it is being read."),
    "READ_FAILED": Code(ERR, "The operating system refused to read the file.", "Check permissions and the disk."),
    "LAYOUT_UNSUPPORTED": Code(ERR, "A known layout that lora-hub does not read (diffusers, kohya, MLX .npz).",
                               "Use the tool made for that layout."),
    "LAYOUT_UNKNOWN": Code(ERR, "The file follows no adapter layout lora-hub knows.", "Check that it is an adapter."),
    "GIT_LFS_POINTER": Code(ERR, "A Git LFS pointer, not the file it points to.",
                            "Fetch the content: git lfs pull, or download it from the Hub."),
    "PICKLE_REFUSED": Code(ERR, "A pickle checkpoint, not opened because pickles can run code.",
                           "If you trust it, pass allow_pickle=True (CLI: --allow-pickle)."),
    "PICKLE_UNSAFE": Code(ERR, "The pickle holds objects other than tensors; weights-only loading refused it.",
                          "Do not load it; ask its author for safetensors."),
    "WEIGHTS_MISSING": Code(ERR, "An adapter config without the weights it describes.", "Download the weights too."),
    "CONFIG_MISSING": Code(ERR, "Adapter weights without the config needed to read them.",
                           "Put adapter_config.json next to the weights."),
    "PEFT_CONFIG_INVALID": Code(ERR, "adapter_config.json is unreadable or contradicts the tensors.",
                                "Fix adapter_config.json (r, lora_alpha, patterns)."),
    "FEATURE_UNSUPPORTED": Code(ERR, "Not a LoRA adapter: another PEFT method (prefix tuning, IA3, ...).",
                                "Use PEFT for this adapter."),
    "PATTERN_UNSUPPORTED": Code(ERR, "A regular expression in adapter_config.json (target_modules, rank_pattern, "
                                     "alpha_pattern) uses a construct without a linear-time match, such as a "
                                     "backreference or a lookaround; it was not run.",
                                "Rewrite the pattern without it, or list the module names."),
    "PATTERN_TOO_COMPLEX": Code(ERR, "A regular expression in adapter_config.json is over 64 KiB, or the config's "
                                     "patterns would need more than 4,000,000 tests to match every module.",
                                "Use fewer, shorter patterns, or list the module names."),
    "PARAMETER_REQUIRED": Code(ERR, "The layout does not record a value conversion needs (loralib's alpha).",
                               "Pass it: alpha=, enable_lora= (CLI: --alpha, --enable-lora)."),
    "MODULE_CONFLICT": Code(ERR, "A module is both adapted and saved in a way no loader can apply.",
                            "Retrain without listing the module in both target_modules and modules_to_save."),
    "GGUF_INVALID": Code(ERR, "A GGUF file that llama.cpp would not load as a LoRA adapter (unreadable, a model "
                              "rather than an adapter, lora_a without lora_b, factors that do not fit the layer).",
                         "Re-export it (lora-hub convert SOURCE -o adapter.gguf --to gguf --base BASE)."),
    "MLX_CONFIG_INVALID": Code(ERR, "An mlx-lm adapter folder that mlx-lm would refuse: adapter_config.json "
                                    "unreadable or missing rank/scale/dropout/num_layers, or tensors its settings do "
                                    "not make (a module outside keys and num_layers, another rank).",
                               "Re-export it (lora-hub convert SOURCE -o DIR --to mlx)."),
    "EXPORT_REFUSED": Code(ERR, "The adapter cannot be written for that runtime with the same result.",
                           "See the message."),
    "CONVERSION_FAILED": Code(ERR, "The adapter could not be read.", "See the message."),
    "INVALID_ADAPTER": Code(ERR, "The file breaks the format.", "See the message."),
    "BASE_MODEL_UNAVAILABLE": Code(ERR, "The base model could not be described (no config, unknown architecture, "
                                      "not in the local cache).",
                                   "Give a model folder, a config.json, or a Hub id already downloaded."),
    "BASE_MISMATCH": Code(ERR, "The adapter does not fit the base model.", "Use the adapter's own base model."),
    "RUNTIME_STATE": Code(ERR, "The runtime's state does not allow the operation (an unknown adapter, switching "
                                  "while merged, a detached runtime).", "See the message; unmerge() before use()."),
    "COMBINE_INVALID": Code(ERR, "The adapters cannot be combined as asked (method, weights, density, rank, or "
                                 "sources that disagree on a module).", "See the message."),
    "HUB_ERROR": Code(ERR, "The Hub or Hub-compatible server answered with an error.", "See the message."),
    "HUB_REPO_ID_INVALID": Code(ERR, "A repository id that is not namespace/name with safe characters.",
                                "Use namespace/name: letters, digits, '-', '_' and '.'."),
    "HUB_REPO_NOT_FOUND": Code(ERR, "The repository does not exist, or it is private and the token cannot read it.",
                               "Check the id and the endpoint; pass a token for a private repository."),
    "HUB_REVISION_NOT_FOUND": Code(ERR, "The repository has no such branch, tag or commit.",
                                   "List the refs (huggingface_hub list_repo_refs) and pick one."),
    "HUB_ACCESS_DENIED": Code(ERR, "The token is missing, invalid, or may not write there.",
                              "Pass a write token of that namespace (token= or HF_TOKEN)."),
    "HUB_UNREACHABLE": Code(ERR, "The endpoint could not be reached or the transfer broke off, and the cache does "
                                 "not hold the files.", "Check the endpoint and retry; a retry resumes the download."),
    "HUB_NOT_CACHED": Code(ERR, "Offline, and the repository revision is not in the local cache.",
                           "Pull it once while online, or unset HF_HUB_OFFLINE."),
    "HUB_NOT_AN_ADAPTER": Code(ERR, "The repository holds no adapter_model.safetensors, adapter_model.bin or "
                                    "adapter_config.json.", "Check the repository id and revision."),
    "HUB_FORM_MISSING": Code(ERR, "The repository holds the adapter, but not in the form asked for (GGUF, mlx-lm).",
                             "Push it with --with gguf,mlx, or convert the PEFT form (lora-hub convert --to)."),
    "ADAPTER_REJECTED": Code(ERR, "Validation found errors; the adapter was not registered or pushed.",
                             "Run lora-hub validate on it; pass force=True (--force) to keep it anyway, flagged."),
    "NOT_IN_REGISTRY": Code(ERR, "No registry entry of that name, or its file is gone.",
                            "lora-hub list shows the entries; pull the adapter (again)."),
    "REGISTRY_UNUSABLE": Code(ERR, "The registry database is damaged, not a database, a folder, locked, or "
                                   "read-only where a change was asked for.",
                              "Move the damaged file aside (a new registry starts), or set LORA_HUB_HOME."),
    "INTERNAL_ERROR": Code(ERR, "lora-hub failed unexpectedly while checking this file.",
                           "Report it with the file if you can; the file was not accepted."),
    # Conversion notes
    "CHECKSUM_MISMATCH_FORCED": Code(WARN, "A file whose bytes fail its recorded checksum was read because the "
                                          "caller forced it; what is written from it keeps that checksum.",
                                     "Re-download or re-export the file."),
    "PEFT_KEY_IGNORED": Code(WARN, "adapter_config.json has keys lora-hub does not know (and that do not look like "
                                  "LoRA variant switches); they were ignored, as PeftModel ignores them.",
                             "Check that the keys are meant; remove them."),
    "UNTARGETED_MODULES": Code(WARN, "Modules have LoRA tensors that adapter_config.json's target_modules does not "
                                  "match; PEFT would ignore them, lora-hub keeps them.",
                               "Fix target_modules, or drop those tensors."),
    # Header tier
    "FINGERPRINT_INCONSISTENT": Code(ERR, "The stored base fingerprint does not match the file's own module entries: "
                                        "the config was edited inconsistently.",
                                     "Re-convert against the base model (lora-hub convert --base)."),
    "CHECKSUM_ABSENT": Code(INFO, "No tensors_sha256: corruption in transit cannot be detected.",
                            "Re-save with lora-hub to record it."),
    "BASE_UNDECLARED": Code(INFO, "The adapter does not say which base model it is for.",
                            "Convert with --base to record it."),
    # Full tier
    "NON_FINITE": Code(ERR, "A tensor holds NaN or Inf.", "The adapter is broken; retrain or re-export it."),
    "UNTRAINED": Code(WARN, "lora_A or lora_B is all zero in every module: the adapter changes nothing.",
                      "It was probably saved before training; use the trained checkpoint."),
    "ZERO_UPDATE": Code(WARN, "Some modules have an all-zero lora_A or lora_B and change nothing.",
                        "Check the training run; those modules can be dropped."),
    "DTYPE_MIX": Code(INFO, "LoRA factors are stored in more than one dtype.", "Nothing needed; noted for reference."),
    "MAGNITUDE_OUTLIER": Code(WARN, "A tensor's largest value is far outside the adapter's own distribution (over 100 "
                                 "times the median of its role).", "Inspect that module; it may be corrupt."),
    "CHECKSUM_MISMATCH": Code(ERR, "The tensor bytes do not match the stored tensors_sha256.",
                              "The file is corrupt: re-download it."),
    "CHECKSUM_VERIFIED": Code(INFO, "The tensor bytes match the stored tensors_sha256.", "Nothing needed."),
    # Base tier
    "NO_MODULE_MATCHES": Code(ERR, "No adapter module exists in the base model: applied, it would do nothing.",
                              "Use the right base model, or fix the module path prefix."),
    "MODULE_NOT_IN_BASE": Code(ERR, "Adapter modules that are not adaptable layers (linear, Conv1D, embedding, "
                                    "expert parameter) of the base model.",
                               "Use the adapter's own base model and task type."),
    "FEATURES_MISMATCH": Code(ERR, "A module's kind, in/out features or expert count differ from the base layer's.",
                              "The adapter is for another model size."),
    "FAN_IN_FAN_OUT_MISMATCH": Code(ERR, "The file's fan_in_fan_out contradicts the base layer kind (Conv1D stores "
                                       "(in, out), Linear (out, in)): merged, the delta would be transposed.",
                                    "Re-convert with --base, which takes the flag from the layer."),
    "FAN_IN_FAN_OUT_IN_CONFIG": Code(WARN, "adapter_config.json's fan_in_fan_out contradicts the base layer kind; "
                                           "PEFT corrects it when loading.",
                                     "Convert with --base to record it correctly."),
    "ENABLE_LORA_MISMATCH": Code(ERR, "len(enable_lora) does not divide the base layer's output features.",
                                 "The adapter is for another model."),
    "TOKENS_MISMATCH": Code(ERR, "Trainable tokens that do not fit the base model: no embedding at that path, a "
                                 "token outside its vocabulary, or rows of another width.",
                            "Use the adapter's own base model."),
    "REPLACEMENT_NOT_IN_BASE": Code(ERR, "A module to save, or one of its tensors, does not exist in the base model.",
                                    "Use the adapter's own base model and task type."),
    "REPLACEMENT_SHAPE_MISMATCH": Code(ERR, "A replacement tensor's shape differs from the base parameter's.",
                                       "The head was trained for another label count or model."),
    "BASE_NAME_DIFFERS": Code(WARN, "The adapter declares another base model name than the one given.",
                              "Check that the base is the intended one (a local copy is fine)."),
    "BASE_TYPE_DIFFERS": Code(WARN, "The adapter declares another model_type than the base has.",
                              "Check the base model."),
    "FINGERPRINT_MISMATCH": Code(WARN, "The stored fingerprint differs from the base's for the adapter's modules.",
                                 "Check the base model; re-convert against it."),
    "QUANTIZED_BASE": Code(INFO, "Targeted base layers are quantized (bitsandbytes).",
                           "Nothing needed: lora-hub applies adapters to 8-bit layers."),
    # Profiles
    "PEFT_ENABLE_LORA": Code(ERR, "enable_lora modules cannot be loaded by PeftModel as stored.",
                             "lora-hub convert FILE -o DIR --to peft writes their exact plain equivalent."),
    "PEFT_CONFIG_DIFFERS": Code(ERR, "adapter_config.json beside a lora-hub file does not describe it (ranks, "
                                     "scalings, targets or saved modules differ): PeftModel would load the pair with "
                                     "the wrong update, as when the two files come from different writes.",
                                "Write the folder again: lora-hub convert FILE -o DIR --to peft."),
    "PEFT_CONFIG_ABSENT": Code(WARN, "A lora-hub file alone: PeftModel needs adapter_config.json beside it.",
                               "lora-hub convert FILE -o DIR --to peft (or push it) writes one."),
    "PEFT_CANNOT_EXPRESS": Code(ERR, "The adapter combines features that PEFT's adapter_config.json cannot express "
                                     "(DoRA on some layers only, DoRA or lora_bias beside embedding or expert "
                                     "modules): no PEFT folder loads it with the same result.",
                                "Apply it with lora-hub, or convert the layers apart."),
    "PEFT_RESIZE_EMBEDDINGS": Code(WARN, "The adapter brings embedding matrices over another vocabulary size than the "
                                         "base model's: PeftModel loads it only into a base resized to match.",
                                   "Call resize_token_embeddings(N) on the base model first (lora-hub's run time "
                                   "does the equivalent itself)."),
    "VLLM_MODULES_TO_SAVE": Code(ERR, "vLLM loads no modules_to_save but one classification head (classifier or "
                                      "score, stored as <head>.weight and .bias).",
                                 "Merge the replaced modules into the base model, or serve with PEFT."),
    "VLLM_DORA": Code(ERR, "vLLM does not serve DoRA.",
                      "Serve it with PEFT or lora-hub, or merge it into the base weights and serve that model."),
    "VLLM_LORA_BIAS": Code(ERR, "vLLM does not serve lora_bias (a bias on lora_B).",
                           "Serve it with PEFT or lora-hub, or merge it into the base weights."),
    "VLLM_TRAINABLE_TOKENS": Code(ERR, "vLLM does not read trainable tokens (trainable_token_indices).",
                                  "Serve it with PEFT or lora-hub, or write the rows into the base model's "
                                  "embedding."),
    "VLLM_INIT": Code(ERR, "The PEFT folder declares a base-modifying init_lora_weights (PiSSA, OLoRA, CorDA, "
                           "LoftQ), which vLLM refuses; lora-hub read it as its equivalent plain adapter.",
                      "Serve the converted folder: lora-hub convert SOURCE -o DIR --to peft --base BASE (or "
                      "--initial)."),
    "VLLM_EXPERTS": Code(WARN, "LoRA on expert parameters in PEFT's 3-D layout: vLLM takes it as stored only for the "
                               "models it keeps with 3-D expert weights (gpt-oss, Qwen3-VL-MoE, Qwen3.5-MoE and a few "
                               "more).",
                         "For other MoE models (Mixtral, Qwen3-MoE) start vLLM with --enable-mixed-moe-lora-format "
                         "and send is_3d_lora_weight=true with the LoRA request."),
    "VLLM_BASE_WEIGHTS": Code(WARN, "The adapter brings embedding matrices (embed_tokens or lm_head base_layer "
                                    "weights) that vLLM skips, serving the base model's own; they were not compared "
                                    "with the base model's.",
                              "Validate with --base pointing at the base model's weights."),
    "VLLM_BASE_WEIGHTS_DIFFER": Code(ERR, "The embedding matrices the adapter brings differ from the base model's "
                                          "(values, or a resized vocabulary): vLLM skips them or refuses the adapter, "
                                          "so it cannot give PeftModel's result.",
                                     "Save a base model with these matrices and serve the adapter on it, or serve "
                                     "with PEFT or lora-hub."),
    "VLLM_ENABLE_LORA": Code(ERR, "vLLM has no enable_lora.", "Export to PEFT first (lora-hub convert --to peft)."),
    "VLLM_RANK": Code(ERR, "A rank above 512, vLLM's largest --max-lora-rank.",
                      "Reduce the rank (lora-hub merge --rank)."),
    "VLLM_MAX_LORA_RANK": Code(INFO, "The smallest --max-lora-rank that vLLM needs for this adapter.",
                               "Start vLLM with at least this --max-lora-rank."),
    "LLAMA_CPP_ARCH": Code(ERR, "The base model's architecture is not one lora-hub maps to llama.cpp (llama, "
                                "mistral, qwen2, qwen3), whose converter lays out weights per architecture.",
                           "Merge the adapter (lora-hub apply --merge --output DIR) and convert the merged model with "
                           "llama.cpp's convert_hf_to_gguf.py."),
    "LLAMA_CPP_MODULE": Code(ERR, "A module llama.cpp's layout has no tensor for (an expert parameter, a layer the "
                                  "architecture's GGUF does not keep apart).",
                             "Merge the adapter and convert the merged model, or retrain without that module."),
    "LLAMA_CPP_TIED": Code(ERR, "LoRA on an embedding tied to the output projection (llama.cpp applies it to the "
                                "output projection too and aborts), or on an output projection that has no weight of "
                                "its own.",
                           "Merge the adapter and convert the merged model."),
    "LLAMA_CPP_MODULES_TO_SAVE": Code(ERR, "modules_to_save: a GGUF adapter carries LoRA factors only.",
                                      "Merge the adapter and convert the merged model."),
    "LLAMA_CPP_DORA": Code(ERR, "llama.cpp does not apply DoRA.", "Merge the adapter and convert the merged model."),
    "LLAMA_CPP_LORA_BIAS": Code(ERR, "llama.cpp does not apply lora_bias (a bias on lora_B).",
                                "Merge the adapter and convert the merged model."),
    "LLAMA_CPP_TRAINABLE_TOKENS": Code(ERR, "llama.cpp does not read trainable tokens.",
                                       "Merge the adapter and convert the merged model."),
    "LLAMA_CPP_BASE_WEIGHTS_DIFFER": Code(ERR, "The embedding matrices the adapter brings differ from the base "
                                               "model's, and llama.cpp runs the base model's own.",
                                          "Merge the adapter and convert the merged model."),
    "LLAMA_CPP_BASE_WEIGHTS": Code(WARN, "The adapter brings embedding matrices that llama.cpp does not load; they "
                                         "were not compared with the base model's.",
                                   "Give --base with the base model's weights to check them."),
    "LLAMA_CPP_BASE_UNKNOWN": Code(WARN, "Without the base model, its architecture, tensor names and tied embeddings "
                                         "cannot be checked for llama.cpp.", "Give --base."),
    "MLX_ARCH": Code(ERR, "The base model's architecture is not one lora-hub maps to mlx-lm (llama, mistral, qwen2, "
                          "qwen3), whose module names are per architecture.",
                     "Merge the adapter (lora-hub apply --merge --output DIR) and convert that model with "
                     "mlx_lm.convert."),
    "MLX_MODULE": Code(ERR, "A module mlx-lm cannot wrap as PEFT applies it (an expert parameter, a layer that is not "
                            "linear or an embedding).", "Merge the adapter, or retrain without that module."),
    "MLX_TIED": Code(ERR, "LoRA on an embedding tied to the output projection (mlx-lm's LoRAEmbedding adapts both), "
                          "or on an output projection that has no module of its own.",
                     "Merge the adapter and convert the merged model."),
    "MLX_DORA": Code(ERR, "DoRA on some modules only: mlx-lm's fine_tune_type makes every module DoRA or none.",
                     "Merge the adapter, or retrain with DoRA on every module."),
    "MLX_MODULES_TO_SAVE": Code(ERR, "modules_to_save: an mlx-lm adapter carries LoRA factors only.",
                                "Merge the adapter and convert the merged model."),
    "MLX_LORA_BIAS": Code(ERR, "mlx-lm does not apply lora_bias (a bias on lora_B).",
                          "Merge the adapter and convert the merged model."),
    "MLX_TRAINABLE_TOKENS": Code(ERR, "mlx-lm does not read trainable tokens.",
                                 "Merge the adapter and convert the merged model."),
    "MLX_BASE_WEIGHTS_DIFFER": Code(ERR, "The embedding matrices the adapter brings differ from the base model's, and "
                                         "mlx-lm runs the base model's own.",
                                    "Merge the adapter and convert the merged model."),
    "MLX_BASE_WEIGHTS": Code(WARN, "The adapter brings embedding matrices that mlx-lm does not load; they were not "
                                   "compared with the base model's.",
                             "Give --base with the base model's weights to check them."),
    "MLX_BASE_UNKNOWN": Code(WARN, "Without the base model, its architecture and tied embeddings cannot be checked "
                                   "for mlx-lm.", "Give --base."),
    "LORA_HUB_NOT_CANONICAL": Code(WARN, "The file is valid but not in canonical form (spec/FORMAT.md 16).",
                                   "Re-save it with lora-hub."),
    "LORA_HUB_UNKNOWN_KEY": Code(WARN, "Config or metadata keys that the format does not define (readers ignore "
                                       "them).",
                                 "Remove them, or re-save with lora-hub."),
    "LORA_HUB_CHECKSUM_ABSENT": Code(WARN, "The strict profile expects tensors_sha256.", "Re-save it with lora-hub."),
    "LORA_HUB_BASE_UNDECLARED": Code(WARN, "The strict profile expects the base model and its fingerprint.",
                                     "Convert with --base."),
}


CATALOGUE.update({refusal.code: Code(ERR, f"{refusal.feature[0].upper()}{refusal.feature[1:]}: lora-hub does not "
                                          f"carry it, because {refusal.why}.", refusal.fix)
                  for refusal in REFUSALS.values()})


@dataclass(frozen=True)
class Finding:
    """One thing a validation found: its stable code, severity, where, what, and the fix."""

    code: str
    severity: Severity
    message: str
    fix: str
    file: str | None = None
    tensor: str | None = None
    module: str | None = None

    @classmethod
    def of(cls, code: str, message: str, *, file: str | None = None, tensor: str | None = None,
           module: str | None = None) -> Finding:
        entry = CATALOGUE[code]
        return cls(code, entry.severity, message, entry.fix, file, tensor, module)

    @property
    def where(self) -> str:
        return f"module {self.module}" if self.module else f"tensor {self.tensor}" if self.tensor else ""


@dataclass
class ValidationReport:
    """The verdict on one source: `ok` when no finding is an error."""

    source: str
    level: str
    profile: str | None
    layout: str | None = None
    tiers: list[str] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    resolved: str | None = None
    """How a source that is not a path was found (a registry entry, or pulled from the Hub), and the path read."""

    @property
    def ok(self) -> bool:
        return not self.errors

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity is Severity.ERROR]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.severity is Severity.WARNING]

    @property
    def codes(self) -> list[str]:
        return [f.code for f in self.findings]

    def to_dict(self) -> dict[str, Any]:
        findings = [{**asdict(f), "severity": f.severity.value} for f in self.findings]
        counts = {s.value: sum(f.severity is s for f in self.findings) for s in Severity}
        out = {"source": self.source, "ok": self.ok, "layout": self.layout, "level": self.level,
               "profile": self.profile, "tiers": self.tiers, "counts": counts, "findings": findings}
        if self.resolved:
            out["resolved"] = self.resolved
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


def catalogue_markdown() -> str:
    """spec/CODES.md: every code with its severity, meaning and fix."""
    lines = ["# lora-hub finding codes", "",
             "Generated from the catalogue in `lora_hub/findings.py`; a test keeps the two identical. Regenerate with",
             "`python -c 'import lora_hub.findings as f; print(f.catalogue_markdown(), end=\"\")' > spec/CODES.md`.",
             "Codes are stable across releases: a code never changes meaning, and a removed check",
             "retires its code instead of reusing it. Severity is fixed per code: `error` makes a report invalid;",
             "`warning` fails `lora-hub validate --strict`; `info` never fails.", "",
             "| code | severity | meaning | fix |", "|---|---|---|---|"]
    lines += [f"| `{code}` | {c.severity.value} | {c.meaning} | {c.fix} |" for code, c in CATALOGUE.items()]
    return "\n".join(lines) + "\n"
