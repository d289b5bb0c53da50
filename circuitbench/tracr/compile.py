"""Compile circuitbench's Tracr programs with ``tracr-pypi`` and export them for jax-free use.

Regenerate the committed files (needs the optional ``tracr`` extra: ``pip install tracr-pypi``,
which brings jax and dm-haiku)::

    python -m circuitbench.tracr.compile --out circuitbench/tracr/weights

For each program NAME (see `circuitbench.tracr.programs`) this writes three files:

* ``NAME.npz``: the compiled weights, float32. ``token_embed`` [V, D], ``pos_embed`` [S+1, D] (row 0,
  the BOS position, is zero as in Tracr), ``W_Q``/``W_K``/``W_V`` [L, H, D, K] and ``W_O`` [L, H, K, D]
  (heads padded to the most heads in any layer; unallocated heads are zero), ``W_in`` [L, D, M],
  ``b_in`` [L, M], ``W_out`` [L, M, D], ``b_out`` [L, D] (a layer without an MLP is zero), and
  ``unembed`` [D, n_out]: the compiled model's unembedding applied to the identity of the residual
  space (it is not in Tracr's parameter dict).
* ``NAME.json``: metadata. The token vocabulary and ids, BOS/PAD, max length, output kind and
  values, the residual basis labels, the attention scale, and the components the compiler
  allocated with the residual directions each reads (query, key and value separately for a head)
  and writes, taken from the compiler's craft model. Tracr's SOp labels carry a process-global
  counter (``frac_prevs_5``); they are renamed to the SOps' names so the files are reproducible.
* ``NAME.reference.npz``: Tracr's own outputs on every input of the domain (all sequences of
  length 1..5 over the vocabulary, BOS-prefixed), plus the RASP program's own evaluation, so the
  adapter can be checked against Tracr without jax.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import sys
from pathlib import Path

import numpy as np

from .programs import BOS, PAD, PROGRAMS, get_program

EXTRA_HINT = "the optional extra `tracr-pypi` is needed (pip install tracr-pypi)"


def _import_tracr():
    try:
        import haiku as hk
        import jax
        import jax.numpy as jnp
        from tracr.compiler import (assemble, basis_inference, craft_graph_to_model,
                                    craft_model_to_transformer, expr_to_craft_graph, nodes,
                                    rasp_to_graph)
        from tracr.craft import bases, transformers
        from tracr.rasp import rasp
    except ImportError as err:
        raise ImportError(f"compiling Tracr programs needs jax and tracr: {EXTRA_HINT} ({err})") from err
    return dict(hk=hk, jax=jax, jnp=jnp, assemble=assemble, basis_inference=basis_inference,
                craft_graph_to_model=craft_graph_to_model,
                craft_model_to_transformer=craft_model_to_transformer,
                expr_to_craft_graph=expr_to_craft_graph, nodes=nodes, rasp_to_graph=rasp_to_graph,
                bases=bases, transformers=transformers, rasp=rasp)


# ---- the RASP programs (written after tracr's compiler/lib.py) ----------------------------------
def make_xproportion(rasp):
    """``make_frac_prevs(tokens == "x")``: the numerical mean of ``tokens == "x"`` over positions <= i."""
    bools = rasp.numerical(rasp.tokens == "x").named("is_x")
    prevs = rasp.Select(rasp.indices, rasp.indices, rasp.Comparison.LEQ).named("prevs")
    return rasp.numerical(rasp.Aggregate(prevs, bools, default=0)).named("frac_prevs")


def make_reverse(rasp):
    """``make_reverse(tokens)``: length by selector width, opp_idx = length - indices - 1, then
    aggregate tokens from the position whose index equals opp_idx."""
    all_true = rasp.Select(rasp.tokens, rasp.tokens, rasp.Comparison.TRUE).named("all_true_selector")
    length = rasp.SelectorWidth(all_true).named("length")
    opp_idx = (length - rasp.indices).named("opp_idx")
    opp_idx = (opp_idx - 1).named("opp_idx-1")
    reverse_selector = rasp.Select(rasp.indices, opp_idx, rasp.Comparison.EQ).named("reverse_selector")
    return rasp.Aggregate(reverse_selector, rasp.tokens).named("reverse")


BUILDERS = {"xproportion": make_xproportion, "reverse": make_reverse}


# ---- compiling ----------------------------------------------------------------------------------
def compile_program(name: str) -> dict:
    """Compile program ``name`` with tracr's passes (those of ``compile_rasp_to_model``, with
    compiler_bos="BOS" and the defaults otherwise), keeping the craft model so the components'
    residual subspaces can be exported. Returns the assembled model, craft model, graph, sink and
    the SOp-label renaming."""
    t = _import_tracr()
    rasp, nodes = t["rasp"], t["nodes"]
    spec = get_program(name)
    program = BUILDERS[name](rasp)
    extracted = t["rasp_to_graph"].extract_rasp_graph(program)
    graph, sources, sink = extracted.graph, extracted.sources, extracted.sink
    t["basis_inference"].infer_bases(graph, sink, set(spec.vocab), spec.max_seq_len)
    t["expr_to_craft_graph"].add_craft_components_to_rasp_graph(
        graph, bos_dir=t["bases"].BasisDirection(rasp.tokens.label, BOS), mlp_exactness=100)
    craft_model = t["craft_graph_to_model"].craft_graph_to_model(graph, sources)
    assembled = t["craft_model_to_transformer"].craft_model_to_transformer(
        craft_model=craft_model, graph=graph, sink=sink, max_seq_len=spec.max_seq_len,
        compiler_bos=BOS, compiler_pad=PAD, causal=False)

    names = {}
    for label, node in graph.nodes.items():
        names[label] = node[nodes.EXPR].name
    if len(set(names.values())) != len(names):
        raise ValueError(f"SOp names of {name} are not unique: {sorted(names.values())}")
    return dict(t=t, spec=spec, program=program, assembled=assembled, craft_model=craft_model,
                graph=graph, sink=sink, names=names)


def _renamer(names: dict[str, str]):
    """Maps a tracr basis direction (``length_8:3``, ``length_8_selector_width_attn_output``) to a
    label without the process-global id (``length:3``, ``length_selector_width_attn_output``)."""
    by_length = sorted(names.items(), key=lambda kv: -len(kv[0]))

    def rename(name, value=None) -> str:
        base = str(name)
        for label, sop_name in by_length:
            if base == label:
                base = sop_name
                break
            if base.startswith(label + "_"):
                base = sop_name + base[len(label):]
                break
        return base if value is None else f"{base}:{value}"

    return rename


def _labels(space, rename) -> list[str]:
    return [rename(d.name, d.value) for d in space.basis]


def export_arrays(compiled: dict) -> tuple[dict[str, np.ndarray], dict]:
    """The weights as float32 numpy arrays, and the metadata dict (see the module docstring)."""
    t, spec, assembled = compiled["t"], compiled["spec"], compiled["assembled"]
    hk, jnp = t["hk"], t["jnp"]
    cfg = assembled.model_config
    params = {k: {p: np.asarray(v) for p, v in d.items()} for k, d in assembled.params.items()}
    L, H, K, M = cfg.num_layers, cfg.num_heads, cfg.key_size, cfg.mlp_hidden_size
    D = params["token_embed"]["embeddings"].shape[1]

    arrays = {
        "token_embed": params["token_embed"]["embeddings"],
        "pos_embed": params["pos_embed"]["embeddings"],
        "W_Q": np.zeros((L, H, D, K)), "W_K": np.zeros((L, H, D, K)),
        "W_V": np.zeros((L, H, D, K)), "W_O": np.zeros((L, H, K, D)),
        "W_in": np.zeros((L, D, M)), "b_in": np.zeros((L, M)),
        "W_out": np.zeros((L, M, D)), "b_out": np.zeros((L, D)),
    }
    for l in range(L):
        attn = f"transformer/layer_{l}/attn"
        for proj, key in (("query", "W_Q"), ("key", "W_K"), ("value", "W_V")):
            w, b = params[f"{attn}/{proj}"]["w"], params[f"{attn}/{proj}"]["b"]
            if np.any(b):  # the adapter has no projection biases; Tracr never sets them
                raise ValueError(f"layer {l} {proj} has a non-zero bias; the Tracr adapter cannot run it")
            arrays[key][l] = w.reshape(D, H, K).transpose(1, 0, 2)
        w, b = params[f"{attn}/linear"]["w"], params[f"{attn}/linear"]["b"]
        if np.any(b):
            raise ValueError(f"layer {l} attention output has a non-zero bias")
        arrays["W_O"][l] = w.reshape(H, K, D)
        mlp = f"transformer/layer_{l}/mlp"
        arrays["W_in"][l] = params[f"{mlp}/linear_1"]["w"]
        arrays["b_in"][l] = params[f"{mlp}/linear_1"]["b"]
        arrays["W_out"][l] = params[f"{mlp}/linear_2"]["w"]
        arrays["b_out"][l] = params[f"{mlp}/linear_2"]["b"]

    @hk.without_apply_rng
    @hk.transform
    def unembed_fn(x):
        return assembled.get_compiled_model().unembed(x, use_unembed_argmax=False)

    unembed = np.asarray(unembed_fn.apply({}, jnp.eye(D, dtype=jnp.float32)))
    arrays["unembed"] = unembed.reshape(D, -1)
    arrays = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in arrays.items()}

    rename = _renamer(compiled["names"])
    # assembled labels are str(BasisDirection): "name" or "name:value"; names never hold ":"
    residual_labels = [rename(*label.split(":", 1)) for label in assembled.residual_labels]
    encoding = assembled.input_encoder.encoding_map
    token_ids = {str(tok): int(i) for tok, i in encoding.items()}
    vocab_by_id = [None] * len(token_ids)
    for tok, i in token_ids.items():
        vocab_by_id[i] = tok
    meta = {
        "name": spec.name,
        "program": spec.description,
        "tracr_version": importlib.metadata.version("tracr-pypi"),
        "jax_version": t["jax"].__version__,
        "vocab": [str(v) for v in spec.vocab],
        "tokens_by_id": vocab_by_id,
        "bos": BOS,
        "pad": PAD,
        "bos_id": token_ids[BOS],
        "pad_id": token_ids[PAD],
        "max_seq_len": spec.max_seq_len,
        "output": spec.output,
        "output_values": None if spec.output_values is None else [str(v) for v in spec.output_values],
        "output_labels": _labels(_io_spaces(compiled)["output"], rename),
        "n_layers": L,
        "n_heads": H,
        "key_size": K,
        "mlp_hidden": M,
        "d_model": D,
        "attn_scale": float(1.0 / np.sqrt(K)),
        "causal": bool(cfg.causal),
        "layer_norm": bool(cfg.layer_norm),
        "residual_labels": residual_labels,
        **_components(compiled, rename),
    }
    return arrays, meta


def _io_spaces(compiled):
    """The token, index and output spaces, built as tracr's craft_model_to_transformer builds them."""
    t, spec = compiled["t"], compiled["spec"]
    rasp, bases, nodes = t["rasp"], t["bases"], t["nodes"]
    tokens_values = compiled["graph"].nodes[rasp.tokens.label][nodes.VALUE_SET].union({BOS, PAD})
    return dict(
        tokens=bases.VectorSpaceWithBasis.from_values(rasp.tokens.label, tokens_values),
        indices=bases.VectorSpaceWithBasis.from_values(rasp.indices.label, range(spec.max_seq_len)),
        output=bases.VectorSpaceWithBasis(compiled["sink"][nodes.OUTPUT_BASIS]),
    )


def _components(compiled: dict, rename) -> dict:
    """Which heads and MLPs the compiler allocated, and the residual directions each reads/writes.

    Layer placement follows tracr's own assembly (``assemble._get_model_config_and_module_names``),
    so component ``a{l}.h{h}`` is exactly the weights at layer l, head h of ``NAME.npz``.
    """
    t = compiled["t"]
    transformers, bases = t["transformers"], t["bases"]
    craft = compiled["craft_model"]
    _, module_names = t["assemble"]._get_model_config_and_module_names(craft)
    components = []
    for module_name, block in zip(module_names, craft.blocks):
        layer = int(module_name.split("layer_")[1].split("/")[0])
        if isinstance(block, transformers.MLP):
            writes = _labels(block.snd.output_space, rename)
            components.append({
                "name": f"m{layer}", "kind": "mlp", "layer": layer,
                "computes": sorted({w.split(":")[0] for w in writes}),
                "reads": _labels(block.fst.input_space, rename),
                "writes": writes,
            })
        else:
            for h, head in enumerate(block.as_multi().heads()):
                writes = _labels(head.w_ov.output_space, rename)
                components.append({
                    "name": f"a{layer}.h{h}", "kind": "attention", "layer": layer, "head": h,
                    "computes": sorted({w.split(":")[0] for w in writes}),
                    "reads_q": _labels(head.w_qk.left_space, rename),
                    "reads_k": _labels(head.w_qk.right_space, rename),
                    "reads_v": _labels(head.w_ov.input_space, rename),
                    "writes": writes,
                })
    spaces = _io_spaces(compiled)
    input_writes = _labels(spaces["tokens"], rename) + _labels(spaces["indices"], rename)
    if bases.BasisDirection("one") in craft.residual_space.basis:
        # tracr's token embedding writes the constant "one" direction at every position
        input_writes.append("one")
    return {"components": components, "input_writes": input_writes,
            "logits_reads": _labels(spaces["output"], rename)}


# ---- Tracr's own outputs on the whole domain ------------------------------------------------------
def reference_outputs(compiled: dict, arrays: dict) -> dict[str, np.ndarray]:
    """Tracr's outputs on every input of the domain (BOS-prefixed), padded to max_seq_len + 1.

    ``ids`` [N, S+1] (PAD-padded), ``lengths`` [N] (with BOS); ``scores`` [N, S+1, n_out]: the
    final residual times ``unembed`` (Tracr's numeric output, or its categorical scores before the
    argmax), NaN at padding; ``output`` [N, S+1]: Tracr's own unembedded output (the numeric
    value, or the argmax id; NaN / -1 at padding); ``rasp`` [N, S]: the RASP program evaluated by
    tracr's interpreter on the input without BOS (numeric value, or the index of the output value).
    """
    t, spec, assembled = compiled["t"], compiled["spec"], compiled["assembled"]
    jnp = t["jnp"]
    S = spec.max_seq_len + 1
    n_out = arrays["unembed"].shape[1]
    encoding = assembled.input_encoder.encoding_map
    domain = spec.domain()
    N = len(domain)
    ids = np.full((N, S), encoding[PAD], dtype=np.int64)
    lengths = np.zeros(N, dtype=np.int64)
    scores = np.full((N, S, n_out), np.nan, dtype=np.float32)
    categorical = spec.output == "categorical"
    output = np.full((N, S), -1 if categorical else np.nan, dtype=np.int64 if categorical else np.float32)
    rasp_out = np.full((N, S - 1), -1 if categorical else np.nan,
                       dtype=np.int64 if categorical else np.float64)
    row = 0
    for n in range(1, spec.max_seq_len + 1):
        batch = [seq for seq in domain if len(seq) == n]
        enc = np.array([[encoding[BOS]] + [encoding[tok] for tok in seq] for seq in batch])
        out = assembled.forward(assembled.params, jnp.asarray(enc))
        final = np.asarray(out.transformer_output.output, dtype=np.float32)
        rows = slice(row, row + len(batch))
        ids[rows, :n + 1] = enc
        lengths[rows] = n + 1
        scores[rows, :n + 1] = final @ arrays["unembed"]
        output[rows, :n + 1] = np.asarray(out.unembedded_output)
        for i, seq in enumerate(batch):
            value = compiled["program"](list(seq))
            if categorical:
                value = [spec.output_values.index(v) for v in value]
            rasp_out[row + i, :n] = value
        row += len(batch)
    return {"ids": ids, "lengths": lengths, "scores": scores, "output": output, "rasp": rasp_out}


def export(name: str, out_dir: str | Path) -> list[Path]:
    """Compile ``name`` and write NAME.npz, NAME.json and NAME.reference.npz under ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    compiled = compile_program(name)
    arrays, meta = export_arrays(compiled)
    reference = reference_outputs(compiled, arrays)
    paths = [out_dir / f"{name}.npz", out_dir / f"{name}.json", out_dir / f"{name}.reference.npz"]
    np.savez_compressed(paths[0], **arrays)
    paths[1].write_text(json.dumps(meta, indent=1) + "\n")
    np.savez_compressed(paths[2], **reference)
    return paths


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m circuitbench.tracr.compile",
                                     description="Compile the Tracr programs and export their weights.")
    parser.add_argument("--out", default=str(Path(__file__).parent / "weights"),
                        help="folder for NAME.npz / NAME.json / NAME.reference.npz")
    parser.add_argument("--programs", nargs="+", default=list(PROGRAMS), choices=list(PROGRAMS))
    args = parser.parse_args(argv)
    for name in args.programs:
        for path in export(name, args.out):
            print(f"wrote {path} ({path.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
