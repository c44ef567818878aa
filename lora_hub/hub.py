"""Push and pull adapters to and from the Hugging Face Hub or a Hub-compatible server (`lora-hub serve`).

With transfer.py (resumable downloads), the only module that imports huggingface_hub. A pushed repository is at the
same time a PEFT repository (adapter_model.safetensors is the lora-hub file, adapter_config.json PEFT's config,
README.md a model card), so `PeftModel.from_pretrained(base, repo_id)` and transformers' `load_adapter(repo_id)` read
it. A pull downloads only the adapter files into the Hugging Face cache (completed files only; an interrupted pull is
resumed by the next; offline it is served from the cache), validates them, and records them in the local registry.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .adapter import Adapter
from .errors import (
    AdapterNotFoundError,
    AdapterRejectedError,
    HubAccessError,
    HubError,
    HubUnreachableError,
    LoraHubError,
    NotAnAdapterRepoError,
    NotCachedError,
    RepoIdError,
    RepoNotFoundError,
    RevisionNotFoundError,
)
from .registry import Registry, RegistryEntry

if TYPE_CHECKING:
    from huggingface_hub import HfApi

    from .basemodel import BaseSource

WEIGHTS = "adapter_model.safetensors"
LEGACY_WEIGHTS = "adapter_model.bin"
CONFIG = "adapter_config.json"
GGUF_FILE = "adapter.gguf"
"""The llama.cpp form of a pushed adapter (`push(..., with_forms=["gguf"])`)."""
MLX_FOLDER = "mlx"
"""The folder of the mlx-lm form (adapters.safetensors and its adapter_config.json)."""
FORMS = ("peft", "gguf", "mlx")
"""The forms a repository can hold: PEFT's (always; also the lora-hub file), llama.cpp's and mlx-lm's."""
_REPO_ID = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?/[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}"
                      r"[A-Za-z0-9])?$")
_READ_CHUNK = 4 * 1024 * 1024
_FILE_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".json", ".npz", ".gguf")


@dataclass(frozen=True)
class PushResult:
    """What `push` made: the repository, its URL, the commit and the branch it is on."""

    repo_id: str
    url: str
    commit: str
    revision: str


def is_repo_id(name: object) -> bool:
    """Whether `name` is `namespace/name` with safe parts (no '..', no slashes beyond the one)."""
    return isinstance(name, str) and bool(_REPO_ID.fullmatch(name)) and ".." not in name


def check_repo_id(repo_id: str) -> str:
    """`repo_id` if it `is_repo_id`.

    Raises:
        RepoIdError: Otherwise.
    """
    if not is_repo_id(repo_id):
        raise RepoIdError(f"{repo_id!r} is not a repository id: use namespace/name (letters, digits, '-', '_', '.'; "
                          "no '..')")
    return repo_id


def registry_name(repo_id: str, revision: str | None = None) -> str:
    """The name `pull` records a repository under: the repo id, with `@revision` when one was asked for."""
    return f"{repo_id}@{revision}" if revision else repo_id


def push(adapter_or_path: Adapter | str | os.PathLike[str], repo_id: str, *, private: bool = False,
         token: str | None = None, endpoint: str | None = None, branch: str | None = None,
         commit_message: str | None = None, api: HfApi | None = None, allow_pickle: bool = False,
         with_forms: Sequence[str] = (), base: BaseSource | None = None, **convert_options: Any) -> PushResult:
    """Pushes an adapter as one commit: adapter_model.safetensors (the lora-hub file), adapter_config.json (PEFT's
    config), a model card README.md, and the forms asked for beside them, so that one repository serves PEFT, vLLM,
    llama.cpp and mlx-lm users.

    Args:
        adapter_or_path: An Adapter, or any adapter `convert_adapter` reads (lora-hub file, PEFT folder, ...).
        with_forms: Also push "gguf" (adapter.gguf, for llama.cpp, Ollama, LM Studio) and "mlx" (mlx/, for
            mlx-lm); each is written exactly or refused by name (ExportError) before anything is pushed.
        base: The base model those forms are laid out for (see `to_gguf`); by default the declared one.
        repo_id: `namespace/name`; created if it does not exist (`private` applies then).
        token: A write token; by default huggingface_hub's (HF_TOKEN, then the saved login).
        endpoint: The Hub URL; by default huggingface_hub's (HF_ENDPOINT, else huggingface.co).
        branch: The branch to commit to, created from main if needed; default main.
        api: An HfApi to use (its endpoint and token) instead of one made from `endpoint` and `token`.

    Raises:
        AdapterRejectedError: The adapter fails validation (nothing is pushed).
        ExportError: A form asked for cannot carry the adapter exactly (nothing is pushed).
        HubAccessError, RepoNotFoundError, HubUnreachableError, HubError: The Hub refused or was unreachable.
    """
    from huggingface_hub import CommitOperationAdd, HfApi

    from .convert import convert_adapter, to_gguf, to_mlx, to_peft
    from .validate import validate

    check_repo_id(repo_id)
    unknown = [f for f in with_forms if f not in FORMS]
    if unknown:
        raise ValueError(f"with_forms takes {', '.join(FORMS[1:])}, not {', '.join(map(repr, unknown))}")
    adapter = adapter_or_path if isinstance(adapter_or_path, Adapter) else \
        convert_adapter(adapter_or_path, allow_pickle=allow_pickle, **convert_options)
    with tempfile.TemporaryDirectory(prefix="lora-hub-push-") as folder:
        to_peft(adapter, folder)
        report = validate(Path(folder) / WEIGHTS, level="full")
        if not report.ok:
            raise AdapterRejectedError(f"the adapter fails validation ({', '.join(f.code for f in report.errors)}); "
                                       "nothing was pushed", findings=report.errors,
                                       path=getattr(adapter, "source", None))
        names = [WEIGHTS, CONFIG, "README.md"]
        if "gguf" in with_forms:
            to_gguf(adapter, Path(folder) / GGUF_FILE, base=base)
            names.append(GGUF_FILE)
        if "mlx" in with_forms:
            to_mlx(adapter, Path(folder) / MLX_FOLDER, base=base)
            names += [f"{MLX_FOLDER}/{n}" for n in ("adapters.safetensors", "adapter_config.json")]
        forms = [f for f in FORMS if f == "peft" or f in with_forms]
        (Path(folder) / "README.md").write_text(model_card(adapter, repo_id, forms), encoding="utf-8")
        operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(Path(folder) / name))
                      for name in names]
        api = api if api is not None else HfApi(endpoint=endpoint, token=token)
        with _hub(repo_id, api.endpoint):
            repo_url = api.create_repo(repo_id, private=private, exist_ok=True)
            if branch:
                api.create_branch(repo_id, branch=branch, exist_ok=True)
            info = api.create_commit(repo_id, operations, commit_message=commit_message or "Upload adapter with "
                                     "lora-hub", revision=branch)
    return PushResult(repo_id, str(repo_url), info.oid, branch or "main")


def pull(repo_id: str, *, revision: str | None = None, token: str | None = None, endpoint: str | None = None,
         force: bool = False, cache_dir: str | os.PathLike[str] | None = None,
         registry: Registry | None = None, api: HfApi | None = None, form: str = "peft",
         with_base: bool = False) -> Path:
    """Downloads an adapter repository's adapter files into the Hugging Face cache, validates them, and records
    them in the registry under `repo_id` (or `repo_id@revision`).

    Works offline from the cache (HF_HUB_OFFLINE=1). A pull that was interrupted (the connection broke, or the
    process was killed) is resumed by the next one with a range request, and the weights are checked against their
    sha256 (see lora_hub.transfer). Reads repositories pushed by lora-hub and plain PEFT ones;
    a legacy adapter_model.bin is downloaded only when there is no safetensors file (and never unpickled here).
    `api` (an HfApi) may stand for `endpoint` and `token`; `registry` and `cache_dir` default to the user's.
    `form` "gguf" or "mlx" also downloads that form of the adapter (pushed with `with_forms`) and returns it, for
    llama.cpp or mlx-lm; the adapter is validated and registered from its PEFT form all the same. `with_base` also
    fetches the base model the adapter declares (see `fetch_base`), so that applying it later needs no network.

    Returns:
        The adapter: the lora-hub file, or the snapshot folder for a PEFT adapter; for `form` "gguf" the GGUF file,
        for "mlx" the mlx-lm folder.

    Raises:
        AdapterRejectedError: The adapter fails validation (unless `force`: then it is registered, flagged invalid).
        RepoNotFoundError, RevisionNotFoundError, NotAnAdapterRepoError, NotCachedError, HubUnreachableError.
        FormMissingError: The repository has no `form` form.
    """
    from huggingface_hub import HfApi
    from huggingface_hub import errors as hf_errors

    from .transfer import prefetch, sweep
    from .validate import validate

    check_repo_id(repo_id)
    if form not in FORMS:
        raise ValueError(f"form must be one of {', '.join(FORMS)}, got {form!r}")
    registry = registry if registry is not None else Registry()
    api = api if api is not None else HfApi(endpoint=endpoint, token=token)
    options = {"revision": revision, "token": token,
               "cache_dir": os.fspath(cache_dir) if cache_dir is not None else None}
    with _hub(repo_id, api.endpoint, revision):
        try:  # the weights through a resumable download: a killed pull is continued, not restarted
            prefetch(api, repo_id, WEIGHTS, revision=revision, cache_dir=cache_dir)
        except hf_errors.EntryNotFoundError:
            pass  # no safetensors weights: a legacy repository, looked at below
        snapshot = Path(api.snapshot_download(repo_id, allow_patterns=[WEIGHTS, CONFIG], **options))
        if not (snapshot / WEIGHTS).is_file():
            snapshot = Path(api.snapshot_download(repo_id, allow_patterns=[LEGACY_WEIGHTS, CONFIG], **options))
    sweep(repo_id, cache_dir=cache_dir)
    weights = next((snapshot / n for n in (WEIGHTS, LEGACY_WEIGHTS) if (snapshot / n).is_file()), None)
    if weights is None:
        raise NotAnAdapterRepoError(f"{registry_name(repo_id, revision)} holds no {WEIGHTS} or {LEGACY_WEIGHTS}: "
                                    "it is not an adapter repository (check the id and revision)")
    target = weights if weights.suffix == ".safetensors" and _is_lora_hub(weights) else snapshot
    report = validate(target, level="full")
    codes = [f.code for f in report.errors]
    if codes and not force:
        raise AdapterRejectedError(f"the adapter from {repo_id} fails validation ({', '.join(codes)}); it was not "
                                   "registered. Run `lora-hub validate` on it, or pull with force=True (--force) to "
                                   "keep it flagged as invalid", findings=report.errors, path=target)
    entry = _entry(repo_id, revision, snapshot.name, target, weights, api.endpoint, codes)
    registry.record(entry)
    if with_base:
        if not entry.base_model:
            from .errors import BaseModelError

            raise BaseModelError(f"{repo_id} declares no base model to fetch (it was pulled and registered)")
        base_folder(entry.base_model, token=token, api=api)
    if form == "peft":
        return target
    return _pull_form(api, repo_id, form, snapshot.name, options)


def _pull_form(api: HfApi, repo_id: str, form: str, commit: str, options: dict[str, Any]) -> Path:
    """The GGUF or mlx-lm form of the adapter at the commit just pulled (so the forms come from the same push)."""
    from .errors import FormMissingError

    patterns = [GGUF_FILE] if form == "gguf" else [f"{MLX_FOLDER}/adapters.safetensors",
                                                   f"{MLX_FOLDER}/adapter_config.json"]
    with _hub(repo_id, api.endpoint, commit):
        snapshot = Path(api.snapshot_download(repo_id, allow_patterns=patterns, **{**options, "revision": commit}))
    found = snapshot / (GGUF_FILE if form == "gguf" else MLX_FOLDER)
    if not all((snapshot / p).is_file() for p in patterns):
        raise FormMissingError(f"{repo_id} @ {commit[:12]} has no {form} form ({', '.join(patterns)}): push it with "
                               f"`lora-hub push ... --with {form}`, or convert the PEFT form yourself "
                               f"(`lora-hub convert {repo_id} -o OUT --to {form}`)")
    return found


@dataclass(frozen=True)
class Resolved:
    """What a name the user gave turned out to be: the adapter to read, and how it was found."""

    path: Path
    how: str
    """"path" (an existing file or folder), "registry" (an entry of the local registry) or "hub" (pulled now)."""
    name: str

    def __str__(self) -> str:
        if self.how == "path":
            return self.name
        where = "registry entry" if self.how == "registry" else "pulled from the Hub into the registry"
        return f"{self.name} ({where}: {self.path})"


def resolve(source: str | os.PathLike[str], *, registry: Registry | None = None, **pull_options: Any) -> Resolved:
    """Turns what the user named into an adapter to read: an existing path, else a registry name, else a Hub repo
    id with an optional @revision (pulled: validated and recorded, unless HF_HUB_OFFLINE and not cached).

    Raises:
        AdapterNotFoundError: None of them. And the errors of `pull` for a Hub id.
    """
    path = Path(source)
    name = os.fspath(source)
    if path.exists():
        return Resolved(path, "path", name)
    registry = registry if registry is not None else Registry()
    if name in registry:
        return Resolved(registry.resolve(name), "registry", name)
    repo_id, _, revision = name.partition("@")
    looks_like_a_file = repo_id.lower().endswith(_FILE_SUFFIXES)  # a mistyped path, not a Hub lookup
    if is_repo_id(repo_id) and not looks_like_a_file:
        return Resolved(pull(repo_id, revision=revision or None, registry=registry, **pull_options), "hub", name)
    raise AdapterNotFoundError(f"{name!r} is neither a file or folder, nor a registry name, nor a Hub repository "
                               "id (namespace/name)")


def locate(source: str | os.PathLike[str], *, registry: Registry | None = None, **pull_options: Any) -> Path:
    """The adapter that `source` names (see `resolve`)."""
    return resolve(source, registry=registry, **pull_options).path


BASE_MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors", "model-*.safetensors",
                    "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model",
                    "special_tokens_map.json", "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt",
                    "chat_template.jinja", "chat_template.json")
"""What `fetch_base` downloads of a model repository: the config, the safetensors weights, the tokenizer. Never a
pickle checkpoint, optimizer state, other formats (GGUF, ONNX) or other files."""


def base_folder(base: str | os.PathLike[str], *, revision: str | None = None, token: str | None = None,
                endpoint: str | None = None, api: HfApi | None = None) -> Path:
    """The local folder of a base model: `base` itself when it is a folder, else the Hub model `base` in the Hugging
    Face cache, downloaded first when needed (see `fetch_base`).

    Raises:
        BaseModelError: `base` is neither a folder nor a Hub id (a path on the machine the adapter was trained on,
            say), or the repository holds no config.json or no safetensors weights.
        And the Hub errors of `fetch_base`.
    """
    from .errors import BaseModelError

    path = Path(base)
    if path.is_dir():
        return path
    name = os.fspath(base)
    if not is_repo_id(name):
        raise BaseModelError(f"the base model {name!r} is not a local folder, and not a Hub repository id to fetch "
                             "(namespace/name): it is probably a path on the machine the adapter was made on; give "
                             "the base model (base=, CLI --base)", path=name)
    return fetch_base(name, revision=revision, token=token, endpoint=endpoint, api=api)


def fetch_base(repo_id: str, *, revision: str | None = None, token: str | None = None, endpoint: str | None = None,
               api: HfApi | None = None) -> Path:
    """Downloads the files a transformers model needs (BASE_MODEL_FILES) from the Hub (the endpoint and token rules
    of `pull`) into the standard Hugging Face cache, with huggingface_hub's progress bars, and returns the snapshot
    folder. Files already in the cache are not downloaded again; with HF_HUB_OFFLINE=1 the cache is used alone.

    Raises:
        BaseModelError: The repository holds no config.json or no safetensors weights.
        RepoNotFoundError, RevisionNotFoundError, HubAccessError, HubUnreachableError, NotCachedError.
    """
    from huggingface_hub import HfApi

    from .errors import BaseModelError

    check_repo_id(repo_id)
    api = api if api is not None else HfApi(endpoint=endpoint, token=token)
    with _hub(repo_id, api.endpoint, revision):
        snapshot = Path(api.snapshot_download(repo_id, revision=revision, allow_patterns=list(BASE_MODEL_FILES),
                                              token=token))
    if not (snapshot / "config.json").is_file():
        raise BaseModelError(f"{repo_id} has no config.json: not a transformers model repository", path=repo_id)
    if not any(snapshot.glob("*.safetensors")):
        raise BaseModelError(f"{repo_id} has no safetensors weights (lora-hub never downloads or unpickles "
                             "pytorch_model.bin): convert the model to safetensors, or give a local folder",
                             path=repo_id)
    return snapshot


def remove(name: str, *, from_cache: bool = False, registry: Registry | None = None) -> RegistryEntry:
    """Removes a registry entry and, with `from_cache`, its revision from the Hugging Face cache (unless another
    entry still uses that revision)."""
    from huggingface_hub import scan_cache_dir

    registry = registry if registry is not None else Registry()
    entry = registry.remove(name)
    if from_cache and entry.commit_sha:
        shared = any(e.commit_sha == entry.commit_sha and e.repo_id == entry.repo_id for e in registry.list())
        repo_folder = next((p for p in Path(entry.path).parents if p.name.startswith("models--")), None)
        if not shared and repo_folder is not None and repo_folder.exists():
            scan_cache_dir(repo_folder.parent).delete_revisions(entry.commit_sha).execute()
    return entry


def model_card(adapter: Adapter, repo_id: str, forms: Sequence[str] = ("peft",)) -> str:
    """The README.md of a pushed adapter: YAML front matter for the Hub, a summary, and usage snippets for each form
    the repository holds."""
    config = adapter.config
    base = config.base_model.name if config.base_model and config.base_model.name else None
    tags = ["lora", "lora-hub", "peft", *[t for t in config.tags if t not in ("lora", "lora-hub", "peft")]]
    front = ["---"]
    if base:
        front.append(f"base_model: {_yaml_string(base)}")
    front.append("library_name: peft")
    if config.license:
        front.append(f"license: {_yaml_string(config.license)}")
    front.append("tags:")
    front += [f"- {_yaml_string(t)}" for t in tags]
    front.append("---")
    ranks = sorted({s.r for s in config.modules.values()})
    targets = sorted({m.rsplit(".", 1)[-1] for m in config.modules})
    title = config.name or repo_id.split("/")[1]
    lines = [
        *front, "", f"# {title}", "",
        config.description or "A LoRA adapter in the lora-hub format, which is also a PEFT adapter.", "",
        "| | |", "|---|---|",
        f"| base model | {base or 'not declared'} |",
        f"| modules | {len(config.modules)} ({', '.join(targets)}) |",
        f"| rank | {', '.join(map(str, ranks))} |",
        f"| task | {config.task_type or 'not declared'} |", "",
        "## Usage", "",
        "With lora-hub (switch, stack and merge adapters at run time):", "",
        "```python", "import lora_hub", "", "runtime = lora_hub.attach(model)",
        f'runtime.load("adapter", "{repo_id}")', 'runtime.use("adapter")', "```", "",
        "or from the command line: `lora-hub pull " + repo_id + " && lora-hub apply --prompt \"...\"`.", "",
        "With PEFT:", "", "```python", "from peft import PeftModel", "",
        f'model = PeftModel.from_pretrained(base_model, "{repo_id}")', "```", "",
    ]
    if "gguf" in forms:
        lines += [f"With llama.cpp (the base model converted by its convert_hf_to_gguf.py): `{GGUF_FILE}`, e.g. "
                  f"`lora-hub pull {repo_id} --form gguf` then `llama-cli -m base.gguf --lora PATH`.", ""]
    if "mlx" in forms:
        lines += [f"With mlx-lm: the `{MLX_FOLDER}/` folder, e.g. `lora-hub pull {repo_id} --form mlx` then "
                  "`mlx_lm.generate --model BASE --adapter-path PATH`.", ""]
    return "\n".join(lines)


def _yaml_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _is_lora_hub(path: Path) -> bool:
    from .format import read_safetensors_header

    try:
        return "lora_hub.config" in read_safetensors_header(path).metadata
    except LoraHubError:
        return False


def _entry(repo_id: str, revision: str | None, commit: str, target: Path, weights: Path, endpoint: str | None,
           codes: list[str]) -> RegistryEntry:
    from .summary import summarize

    digest = hashlib.sha256()
    with weights.open("rb") as f:
        while chunk := f.read(_READ_CHUNK):
            digest.update(chunk)
    ranks: list[int] = []
    targets: list[str] = []
    base = None
    if not codes:
        summary = summarize(target)
        ranks = sorted({g.r for g in summary.groups})
        targets = sorted(summary.targets)
        base = (summary.base_model or {}).get("name")
    return RegistryEntry(name=registry_name(repo_id, revision), path=str(target), repo_id=repo_id,
                         revision=revision, commit_sha=commit, sha256=digest.hexdigest(), base_model=base,
                         ranks=ranks, targets=targets, size=weights.stat().st_size, source=_endpoint(endpoint),
                         valid=not codes, findings=codes)


def _endpoint(endpoint: str | None) -> str:
    from huggingface_hub import constants

    return (endpoint or constants.ENDPOINT).rstrip("/")


@contextmanager
def _hub(repo_id: str, endpoint: str | None, revision: str | None = None) -> Iterator[None]:
    """Maps huggingface_hub's exceptions to lora-hub's, and keeps transfers off Xet and telemetry off for endpoints
    other than the public Hub."""
    import httpx2
    from huggingface_hub import constants, errors

    where = f"{repo_id} at {_endpoint(endpoint)}"
    xet, telemetry = constants.HF_HUB_DISABLE_XET, constants.HF_HUB_DISABLE_TELEMETRY
    if not _endpoint(endpoint).endswith("huggingface.co"):
        # A Hub-compatible server speaks plain HTTP and LFS, and talking to it must not reach huggingface.co (the
        # client's telemetry asks the public Hub for its agent list on the first request of a process).
        constants.HF_HUB_DISABLE_XET = constants.HF_HUB_DISABLE_TELEMETRY = True
    try:
        yield
    except errors.RevisionNotFoundError as e:
        raise RevisionNotFoundError(f"{where} has no revision {revision!r}") from e
    except errors.RepositoryNotFoundError as e:
        raise RepoNotFoundError(f"repository {where} not found: check the id, or pass a token if it is "
                                "private") from e
    except errors.LocalEntryNotFoundError as e:
        if constants.HF_HUB_OFFLINE:
            raise NotCachedError(f"offline (HF_HUB_OFFLINE) and {where} is not in the local cache: pull it once "
                                 "while online") from e
        raise HubUnreachableError(f"cannot reach {where} and the cache does not hold it: {_first_line(e)}") from e
    except errors.EntryNotFoundError as e:
        raise NotAnAdapterRepoError(f"{where}: {_first_line(e)}") from e
    except errors.HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else None
        if status in (401, 403):
            raise HubAccessError(f"{where}: access denied ({status}): pass a token with the rights needed "
                                 f"(token= or HF_TOKEN). {_first_line(e)}") from e
        raise HubError(f"{where}: {_first_line(e)}") from e
    except (httpx2.TransportError, OSError) as e:
        if isinstance(e, LoraHubError):
            raise
        raise HubUnreachableError(f"the transfer from {where} failed: {e.__class__.__name__}: {e}. Retry: the "
                                  "download resumes where it stopped") from e
    finally:
        constants.HF_HUB_DISABLE_XET, constants.HF_HUB_DISABLE_TELEMETRY = xet, telemetry


def _first_line(error: Exception) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else error.__class__.__name__
