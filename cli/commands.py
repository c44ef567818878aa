"""The commands of `lora-hub`: each parses its options, calls one public function of lora_hub, and prints."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import click

import lora_hub

from .terminal import echo


def debug_enabled() -> bool:
    """LORA_HUB_DEBUG=1 shows tracebacks and third-party warnings and progress bars."""
    return os.environ.get("LORA_HUB_DEBUG") == "1"


class BoolList(click.ParamType):
    """A comma-separated list of booleans, such as 1,0,1 or true,false,true."""

    name = "bools"
    _values = {"1": True, "true": True, "t": True, "yes": True, "0": False, "false": False, "f": False, "no": False}

    def convert(self, value, param, ctx):
        if isinstance(value, list):
            return value
        try:
            return [self._values[v.strip().lower()] for v in value.split(",")]
        except KeyError:
            self.fail(f"{value!r} is not a comma-separated list of booleans (for example 1,0,1)", param, ctx)


class FormList(click.ParamType):
    """A comma-separated list of the forms push adds beside the PEFT files: gguf, mlx."""

    name = "forms"

    def convert(self, value, param, ctx):
        if isinstance(value, list):
            return value
        forms = [part.strip().lower() for part in value.split(",") if part.strip()]
        unknown = [f for f in forms if f not in ("gguf", "mlx")]
        if unknown:
            self.fail(f"{', '.join(unknown)}: the forms are gguf and mlx (for example gguf,mlx)", param, ctx)
        return forms


def _resolved(source: str) -> str:
    """The adapter a name stands for (a path, a registry name, a Hub id pulled now), said on stderr when it is not
    a path."""
    from lora_hub.hub import resolve

    found = resolve(source)
    if found.how != "path":
        echo(f"{found}", err=True)
    return str(found.path)


@click.command()
@click.argument("path")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.option("--modules", "show_modules", is_flag=True, help="List every module with its settings.")
@click.option("--allow-pickle", is_flag=True, help="Open pickle checkpoints (.bin/.pt) with weights-only loading.")
@click.option("--alpha", type=float, help="lora_alpha, for loralib checkpoints (they do not record it).")
@click.option("--base", help="Base model (folder, config.json, or Hub id in the local cache), for adapters that need "
                             "it: GGUF (tensor names), mlx-lm (layer kinds), PEFT with several expert parameters on "
                             "one module or PiSSA and OLoRA inits.")
@click.option("--initial", type=click.Path(exists=True), help="The initial adapter of a base-modifying init "
              "(PiSSA, OLoRA, CorDA, LoftQ, LoRA-GA), as PEFT saves it before training.")
def inspect(path: str, as_json: bool, show_modules: bool, allow_pickle: bool, alpha: float | None, base: str | None,
            initial: str | None) -> None:
    """Summarise the adapter at PATH (a file or folder, a registry name, or a Hub repo id): base model, modules,
    ranks, features, dtypes, size, layout."""
    options = {k: v for k, v in (("base", base), ("initial", initial)) if v is not None}
    summary = lora_hub.summarize(_resolved(path), allow_pickle=allow_pickle, alpha=alpha, **options)
    if as_json:
        echo(json.dumps(summary.to_dict(), indent=2))
        return
    for label, value in _summary_lines(summary):
        echo(f"{label:<17}{value}")
    if show_modules:
        for name, spec in summary.modules.items():
            words = [spec["kind"]] if spec.get("kind", "linear") == "embedding" else []
            words += [f"experts={spec['experts']}"] if spec.get("experts") else []
            words += [f"r={spec['r']}", f"alpha={spec['alpha']}", f"in={spec['in_features']}",
                      f"out={spec['out_features']}"]
            words += ["fan_in_fan_out"] if spec["fan_in_fan_out"] else []
            words += [f"enable_lora={spec['enable_lora']}"] if spec["enable_lora"] else []
            words += [key for key in ("bias", "dora", "replaces_base") if spec.get(key)]
            echo(f"  {name}  {' '.join(words)}")


def _summary_lines(summary: lora_hub.AdapterSummary) -> list[tuple[str, str]]:
    base = summary.base_model or {}
    version = f" v{summary.format_version}" if summary.format_version else ""
    lines = [("path", summary.path), ("layout", summary.layout + version)]
    if base.get("name") or base.get("model_type"):
        extra = ", ".join(f"{k} {base[k]}" for k in ("model_type", "revision") if base.get(k))
        lines.append(("base model", f"{base.get('name') or '?'}" + (f" ({extra})" if extra else "")))
    if base.get("fingerprint"):
        lines.append(("fingerprint", base["fingerprint"]))
    if summary.task_type:
        lines.append(("task type", summary.task_type))
    targets = ", ".join(f"{name} x{count}" for name, count in summary.targets.items())
    lines.append(("modules", f"{summary.module_count}: {targets}"))
    for group in summary.groups:
        flags = "".join([" rslora" if group.rslora else "", " fan_in_fan_out" if group.fan_in_fan_out else "",
                         f" enable_lora={group.enable_lora}" if group.enable_lora else "",
                         f" {group.kind}" if group.kind == "embedding" else "",
                         f" {group.experts} experts" if group.experts else "",
                         "".join(f" {feature}" for feature in group.features)])
        lines.append(("settings", f"{group.count} x r={group.r} alpha={group.alpha:g} "
                                  f"(scaling {group.scaling:g}){flags}"))
    dtypes = ", ".join(f"{dtype} x{count}" for dtype, count in summary.dtypes.items())
    lines.append(("tensors", f"{summary.tensor_count} ({dtypes}), {summary.parameters:,} LoRA parameters"))
    lines.append(("size", f"{summary.size_bytes:,} bytes"))
    if summary.features:
        lines.append(("features", ", ".join(summary.features)))
    if summary.trainable_tokens:
        lines.append(("trainable tokens", ", ".join(f"{m} ({n} rows)" for m, n in summary.trainable_tokens.items())))
    if summary.modules_to_save:
        lines.append(("modules to save", ", ".join(summary.modules_to_save)))
    lines += [(key, str(value)) for key, value in summary.descriptive.items()]
    if summary.tensors_sha256:
        lines.append(("tensors sha256", summary.tensors_sha256))
    return lines


@click.command()
@click.argument("source")
@click.option("-o", "--output", required=True, type=click.Path(),
              help="The lora-hub or GGUF file to write, or the folder for --to peft and --to mlx.")
@click.option("--to", "target", type=click.Choice(["lora-hub", "peft", "gguf", "mlx"]), default="lora-hub",
              show_default=True, help="Output layout: gguf for llama.cpp (and Ollama, LM Studio), mlx for mlx-lm.")
@click.option("--outtype", type=click.Choice(["f32", "f16", "bf16", "q8_0"]), default="f32", show_default=True,
              help="For --to gguf: the tensor type (f32 is exact).")
@click.option("--base", help="Base model (folder, config.json, or Hub id in the local cache): checks every module "
                             "and records the base model's type and fingerprint. GGUF reading and writing need it "
                             "(or the one the adapter declares).")
@click.option("--allow-pickle", is_flag=True, help="Open pickle checkpoints (.bin/.pt) with weights-only loading.")
@click.option("--alpha", type=float, help="lora_alpha, for loralib checkpoints (they do not record it).")
@click.option("--r", "rank", type=click.IntRange(min=1), help="Rank, checked against loralib tensors.")
@click.option("--enable-lora", type=BoolList(), help="For loralib MergedLinear modules, e.g. 1,0,1.")
@click.option("--fan-in-fan-out/--no-fan-in-fan-out", default=None,
              help="For loralib checkpoints of Conv1D (GPT-2) bases, when --base is not given.")
@click.option("--force", is_flag=True, help="Read a lora-hub file whose bytes fail its checksum anyway; the output "
                                            "keeps the mismatching checksum, so it stays flagged as corrupt.")
@click.option("--initial", type=click.Path(exists=True), help="The initial adapter PEFT saved before training a "
              "base-modifying init (PiSSA, OLoRA, CorDA, LoftQ, LoRA-GA): converts it to its plain equivalent.")
def convert(source: str, output: str, target: str, outtype: str, base: str | None, allow_pickle: bool,
            alpha: float | None, rank: int | None, enable_lora: list[bool] | None, fan_in_fan_out: bool | None,
            force: bool, initial: str | None) -> None:
    """Convert the adapter at SOURCE (lora-hub, PEFT, early-PEFT MergedLinear, loralib, GGUF, mlx-lm; or a registry
    name or Hub repo id) to OUTPUT."""
    start = time.perf_counter()
    adapter = lora_hub.convert_adapter(_resolved(source), base=base, allow_pickle=allow_pickle, alpha=alpha, r=rank,
                                       enable_lora=enable_lora, fan_in_fan_out=fan_in_fan_out, force=force,
                                       initial=initial)
    if outtype != "f32" and target != "gguf":
        raise click.BadParameter("--outtype is for --to gguf", param_hint="'--outtype'")
    if target == "peft":
        written = lora_hub.to_peft(adapter, output, base=base)
    elif target == "mlx":
        written = lora_hub.to_mlx(adapter, output, base=base)
    elif target == "gguf":
        if Path(output).is_dir():
            raise click.BadParameter(f"'{output}' is a folder; give a file name such as adapter.gguf",
                                     param_hint="'-o'")
        written = lora_hub.to_gguf(adapter, output, base=base, outtype=outtype)
    else:
        if Path(output).is_dir():
            raise click.BadParameter(f"'{output}' is a folder; give a file name (or use --to peft or --to mlx)",
                                     param_hint="'-o'")
        written = lora_hub.save_adapter(adapter, output)
    echo(f"wrote {written} ({target}): {len(adapter.modules)} modules, "
               f"{time.perf_counter() - start:.2f} s")


@click.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path())
@click.option("--base", help="Base model to check against (folder, config.json, or Hub id in the local cache).")
@click.option("--level", type=click.Choice(["header", "full"]), default="full", show_default=True,
              help="header reads only the header; full also streams every tensor's contents.")
@click.option("--profile", type=click.Choice(list(lora_hub.PROFILES)),
              help="Also check that the file will work there with PeftModel's result (spec/PROFILES.md; lora-hub: "
                   "the strict format).")
@click.option("--json", "as_json", is_flag=True, help="Print the reports as a JSON array.")
@click.option("--strict", is_flag=True, help="Fail on warnings too.")
@click.option("--allow-pickle", is_flag=True, help="Open pickle checkpoints (.bin/.pt) with weights-only loading.")
@click.option("--alpha", type=float, help="lora_alpha, for loralib checkpoints (they do not record it).")
@click.option("--initial", type=click.Path(exists=True), help="The initial adapter of a base-modifying init "
              "(PiSSA, OLoRA, CorDA, LoftQ, LoRA-GA), as PEFT saves it before training.")
def validate(paths: tuple[str, ...], base: str | None, level: str, profile: str | None, as_json: bool, strict: bool,
             allow_pickle: bool, alpha: float | None, initial: str | None) -> int:
    """Check adapter files before they touch a model: one verdict per PATH, one line per finding.

    Exit status: 0 when every file is valid, 1 when any has an error (or a warning, with --strict)."""
    extra = {"initial": initial} if initial else {}
    reports = [lora_hub.validate(path, base=base, level=level, profile=profile, allow_pickle=allow_pickle,
                                 alpha=alpha, **extra) for path in paths]
    failed = [r for r in reports if r.errors or (strict and r.warnings)]
    if as_json:
        echo(json.dumps([r.to_dict() for r in reports], indent=2))
        return 1 if failed else 0
    for report in reports:
        counts = f"{_count(len(report.errors), 'error')}, {_count(len(report.warnings), 'warning')}"
        tiers = "+".join(report.tiers) or "unread"
        verdict = "INVALID" if report in failed else "valid"
        source = f"{report.source} ({report.resolved})" if report.resolved else report.source
        echo(f"{source}: {verdict} ({report.layout or 'unknown layout'}; {tiers}; {counts})")
        for finding in report.findings:
            where = f" [{finding.where}]" if finding.where else ""
            fix = "" if finding.severity is lora_hub.Severity.INFO else f" Fix: {finding.fix}"
            echo(f"  {finding.severity.value} {finding.code}{where}: {finding.message}.{fix}")
    return 1 if failed else 0


@click.command()
@click.argument("adapter", required=False)
@click.option("--base", help="Base model folder or Hub id (fetched when not cached); default: the one the adapter "
                             "declares.")
@click.option("--load-in-8bit", is_flag=True, help="Load the base model in 8-bit (bitsandbytes LLM.int8()).")
@click.option("--merge", is_flag=True, help="Merge the adapter into the weights (exact unmerge is kept).")
@click.option("--output", type=click.Path(file_okay=False), help="Save the model, adapter merged, to this folder.")
@click.option("--prompt", help="Generate from this prompt with the adapter applied, and print the text.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=64, show_default=True,
              help="How many tokens to generate after the prompt.")
@click.option("--allow-pickle", is_flag=True, help="Open pickle checkpoints (.bin/.pt) with weights-only loading.")
def apply(adapter: str | None, base: str | None, load_in_8bit: bool, merge: bool, output: str | None,
          prompt: str | None, max_new_tokens: int, allow_pickle: bool) -> None:
    """Put the ADAPTER on its base model: generate with --prompt, merge with --merge, save with --output.

    ADAPTER is a file or folder, a registry name, or a Hub repo id (pulled first); by default the adapter pulled
    most recently."""
    from lora_hub.runtime.apply import generate, open_with_adapter

    if adapter is None:
        adapter = lora_hub.Registry().latest().name
        echo(f"using {adapter}, the adapter pulled most recently", err=True)
    start = time.perf_counter()
    applied = open_with_adapter(adapter, base=base, load_in_8bit=load_in_8bit, allow_pickle=allow_pickle)
    layers = len(applied.runtime.layers)
    echo(f"{adapter} on {applied.base}{' (8-bit)' if load_in_8bit else ''}: {layers} layers adapted, "
               f"{time.perf_counter() - start:.2f} s", err=True)
    if merge or output:
        with click.progressbar(length=layers, label="merging", file=click.get_text_stream("stderr")) as bar:
            applied.runtime.merge(progress=lambda done, total: bar.update(1))
    if output:
        applied.runtime.save_merged(output)
        if applied.tokenizer is not None:
            applied.tokenizer.save_pretrained(output)
        echo(f"saved the merged model to {output}", err=True)
    if prompt is not None:
        echo(generate(applied, prompt, max_new_tokens=max_new_tokens))


@click.command()
@click.argument("path")
@click.argument("repo")
@click.option("--private", is_flag=True, help="Create the repository private (if it does not exist yet).")
@click.option("--branch", help="Commit to this branch (created from main if needed).")
@click.option("-m", "--message", help="The commit message.")
@click.option("--endpoint", help="The Hub URL (default: HF_ENDPOINT, else huggingface.co).")
@click.option("--allow-pickle", is_flag=True, help="Open pickle checkpoints (.bin/.pt) with weights-only loading.")
@click.option("--with", "with_forms", type=FormList(), default="",
              help="Also push these forms beside the PEFT files: gguf (llama.cpp), mlx (mlx-lm), e.g. gguf,mlx.")
@click.option("--base", help="The base model the GGUF and mlx forms are laid out for (folder, config.json, or Hub id "
                             "in the local cache); default: the one the adapter declares.")
def push(path: str, repo: str, private: bool, branch: str | None, message: str | None, endpoint: str | None,
         allow_pickle: bool, with_forms: list[str], base: str | None) -> None:
    """Push the adapter at PATH (any layout lora-hub reads) to the Hub repository REPO as a lora-hub file that is
    also a PEFT adapter, with a model card, and with --with its llama.cpp and mlx-lm forms. The token comes from
    HF_TOKEN or the saved login."""
    result = lora_hub.push(_resolved(path), repo, private=private, branch=branch, commit_message=message,
                           endpoint=endpoint, allow_pickle=allow_pickle, with_forms=with_forms, base=base)
    echo(f"pushed {path} to {result.url} ({result.revision} @ {result.commit[:12]})")


@click.command()
@click.argument("repo")
@click.option("--revision", help="A branch, tag or commit (default: main).")
@click.option("--force", is_flag=True, help="Keep an adapter that fails validation (it is flagged invalid).")
@click.option("--endpoint", help="The Hub URL (default: HF_ENDPOINT, else huggingface.co).")
@click.option("--form", type=click.Choice(["peft", "gguf", "mlx"]), default="peft", show_default=True,
              help="Also download this form (pushed with --with) and print its path: gguf for llama.cpp, mlx for "
                   "mlx-lm.")
@click.option("--with-base", is_flag=True, help="Also fetch the base model the adapter declares (config, safetensors "
                                               "weights, tokenizer) into the Hugging Face cache.")
def pull(repo: str, revision: str | None, force: bool, endpoint: str | None, form: str, with_base: bool) -> None:
    """Download the adapter in the Hub repository REPO into the Hugging Face cache, validate it, and record it in
    the local registry. Offline (HF_HUB_OFFLINE=1) it is served from the cache."""
    from lora_hub.hub import registry_name

    path = lora_hub.pull(repo, revision=revision, force=force, endpoint=endpoint, form=form, with_base=with_base)
    entry = lora_hub.Registry().get(registry_name(repo, revision))
    flag = "" if entry.valid else f"  INVALID ({', '.join(entry.findings)})"
    echo(f"{entry.name} @ {entry.commit_sha[:12]}: {_size(entry.size)}, rank {_ranks(entry)}, "
               f"base {entry.base_model or '?'}{flag}")
    echo(str(path))


@click.command(name="list")
@click.option("--json", "as_json", is_flag=True, help="Print the entries as JSON.")
def list_(as_json: bool) -> None:
    """List the adapters in the local registry, the most recently pulled first."""
    registry = lora_hub.Registry()
    entries = registry.list()
    if as_json:
        echo(json.dumps([e.to_dict() for e in entries], indent=2))
        return
    if not entries:
        echo(f"no adapters in {registry.path}: pull one (lora-hub pull REPO)")
        return
    rows = [("NAME", "COMMIT", "RANK", "SIZE", "BASE", "PULLED")] + [
        (e.name + ("" if e.valid else " (invalid)"), (e.commit_sha or "-")[:12], _ranks(e), _size(e.size),
         e.base_model or "-", time.strftime("%Y-%m-%d %H:%M", time.localtime(e.updated))) for e in entries]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        echo("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())


@click.command()
@click.argument("name")
@click.option("--cache", "from_cache", is_flag=True, help="Also delete its files from the Hugging Face cache.")
def rm(name: str, from_cache: bool) -> None:
    """Remove NAME from the local registry (and, with --cache, its files from the cache)."""
    from lora_hub.hub import remove

    entry = remove(name, from_cache=from_cache)
    echo(f"removed {entry.name}{' and its cached files' if from_cache else ''}")


@click.command()
@click.option("--root", type=click.Path(file_okay=False), default="lora-hub-server", show_default=True,
              help="Where the server keeps its objects and database.")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=click.IntRange(0, 65535), default=8077, show_default=True, help="0 picks a free port.")
@click.option("--user", default="local", show_default=True, help="The user whose write token is kept in ROOT/token.")
def serve(root: str, host: str, port: int, user: str) -> None:
    """Serve a Hub-compatible registry (what huggingface_hub, PEFT and transformers need) until interrupted."""
    from lora_hub.server import serve as run
    from lora_hub.server import token_file

    tokens = token_file(root, user)

    def ready(url: str) -> None:
        echo(f"serving {Path(root).resolve()} at {url}", err=False)
        echo(f"  HF_ENDPOINT={url} HF_TOKEN=$(cat {tokens}) lora-hub push ADAPTER {user}/NAME", err=True)
        sys.stdout.flush()

    run(root, host=host, port=port, ready=ready)


class FloatList(click.ParamType):
    """A comma-separated list of numbers, such as 0.7,0.3 or 1,-0.5."""

    name = "numbers"

    def convert(self, value, param, ctx):
        if isinstance(value, list):
            return value
        try:
            return [float(part) for part in value.split(",")]
        except ValueError:
            self.fail(f"{value!r} is not a comma-separated list of numbers (for example 0.7,0.3)", param, ctx)


@click.command()
@click.argument("adapters", nargs=-1, required=True)
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="The combined lora-hub file.")
@click.option("--weights", type=FloatList(), help="One weight per adapter, e.g. 0.7,0.3 (default: all 1).")
@click.option("--method", default="cat", show_default=True, metavar="|".join(lora_hub.METHODS),
              help="How to combine: exact in delta space (cat, linear), low rank by SVD (svd, ties, dare_linear, "
                   "dare_ties, magnitude_prune), or PEFT's A/B versions (*_ab).")
@click.option("--rank", type=int, help="Rank of the result, for svd, ties, dare_* and magnitude_prune.")
@click.option("--density", type=float, help="Fraction of values kept, in (0, 1], for ties, dare_*, magnitude_prune.")
@click.option("--majority-sign", type=click.Choice(["total", "frequency"]), default="total", show_default=True,
              help="TIES sign election.")
@click.option("--seed", type=int, help="Seed of DARE's random drops (default: a fresh one, recorded in the file).")
@click.option("--force", is_flag=True, help="Combine adapters that declare different base models.")
def merge(adapters: tuple[str, ...], output: str, weights: list[float] | None, method: str, rank: int | None,
          density: float | None, majority_sign: str, seed: int | None, force: bool) -> None:
    """Combine ADAPTERS (files, PEFT folders, registry names or Hub ids) into one lora-hub file: one summary line
    for what was done per module, and the energy kept by the SVD."""
    reports: list[lora_hub.ModuleReport] = []
    bars = []

    def progress(report: lora_hub.ModuleReport) -> None:
        reports.append(report)
        if not bars:
            bars.append(click.progressbar(length=report.total, label="combining",
                                          file=click.get_text_stream("stderr")))
        bars[0].update(1)
        if report.done == report.total:
            bars[0].render_finish()

    start = time.perf_counter()
    combined = lora_hub.combine([_resolved(a) for a in adapters], weights, method=method, rank=rank, density=density,
                                majority_sign=majority_sign, seed=seed, force=force, on_module=progress)
    path = lora_hub.save_adapter(combined, output)
    provenance = combined.config.provenance
    weights_text = ", ".join(f"{s['name']} x {s['weight']:g}" for s in provenance["sources"])
    ranks = sorted({r.rank for r in reports})
    echo(f"{method}: {weights_text} -> {path} ({_size(path.stat().st_size)}, "
               f"{time.perf_counter() - start:.2f} s)")
    shared = sum(r.sources > 1 for r in reports)
    echo(f"{len(reports)} modules ({shared} in more than one adapter), rank "
               f"{ranks[0] if len(ranks) == 1 else f'{ranks[0]}-{ranks[-1]}'}")
    energies = [r for r in reports if r.energy is not None]
    if energies:
        worst = min(energies, key=lambda r: r.energy)
        mean = sum(r.energy for r in energies) / len(energies)
        lowrank = sum(r.lowrank for r in energies)
        echo(f"energy kept by the SVD: mean {mean:.2%}, lowest {worst.energy:.2%} ({worst.module})"
                   + (f"; {lowrank} large modules by randomized SVD" if lowrank else ""))
    if provenance["parameters"].get("seed") is not None and method.startswith("dare"):
        echo(f"seed {provenance['parameters']['seed']}")


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _ranks(entry: lora_hub.RegistryEntry) -> str:
    return ",".join(map(str, entry.ranks)) or "-"


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


@click.command()
@click.option("--keep", type=click.Path(file_okay=False), help="Keep the demo's files in this folder.")
def demo(keep: str | None) -> None:
    """Tour lora-hub offline: an embedded Hub, a tiny model built from a config, two adapters converted, exported,
    pushed, pulled and validated, then switched, stacked, routed and merged on the 8-bit base."""
    from transformers.utils import logging as transformers_logging

    from lora_hub.demo import run_demo

    if not debug_enabled():
        transformers_logging.disable_progress_bar()
    echo("lora-hub demo: offline (an embedded Hub on 127.0.0.1), tiny models built from configs")
    total = 0.0

    def report(step) -> None:
        nonlocal total
        total += step.seconds
        echo(f"  {step.seconds * 1000:9.1f} ms  {step.title}\n               {step.detail}")

    steps = run_demo(keep, report=report)
    echo(f"done: {len(steps)} steps in {total:.2f} s; every adapter survived the round trip exactly")


ALL_COMMANDS = [inspect, convert, validate, apply, merge, push, pull, list_, rm, serve, demo]
