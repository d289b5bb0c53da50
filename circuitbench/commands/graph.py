"""`circuitbench graph --model SPEC [--circuit FILE] [--json]`: the model's edge graph (and a circuit's size);
random shapes come from their config alone, so `random:codellama-13b` allocates no weights."""
from __future__ import annotations

import json

from ..circuit import Circuit


def add_parser(sub):
    p = sub.add_parser("graph", help="print a model's writers, readers and edges (and a circuit's size)")
    p.add_argument("--model", required=True, help="model spec (random:gpt2-small, smollm2-135m, gpt2, ...)")
    p.add_argument("--circuit", help="a circuit file (circuitbench, EAP-IG/MIB or Edge Pruning JSON)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--names", action="store_true", help="also list every writer and reader name")
    p.set_defaults(func=run)


def run(args) -> int:
    from .. import models

    spec = models.ModelSpec.parse(args.model)
    if spec.known_random:  # the shape is enough: no weights (random:codellama-13b's are 26 GB)
        g, family = models.random_graph(spec.name), models.RANDOM_SHAPES[spec.name][0]
    else:
        model = models.load_model(args.model)
        g, family = model.graph, model.family
    out = {"model": args.model, **g.summary()}
    if args.names:
        out["writer_names"], out["reader_names"] = g.writer_names, g.reader_names
    if args.circuit:
        c = Circuit.load(args.circuit, g)
        out["circuit"] = {"file": args.circuit, **c.summary()}
    if args.json:
        print(json.dumps(out))
        return 0
    blocks = ", parallel blocks" if g.parallel else ""
    print(f"model    {args.model} ({family}, {g.n_layers} layers, {g.n_heads} heads, {g.kv_heads} kv heads{blocks})")
    print(f"writers  {g.n_writers}")
    print(f"readers  {g.n_readers}")
    print(f"edges    {g.n_edges}")
    if args.names:
        print("writer names: " + " ".join(g.writer_names))
        print("reader names: " + " ".join(g.reader_names))
    if args.circuit:
        c = out["circuit"]
        print(f"circuit  {args.circuit}: {c['edges']} of {c['total_edges']} edges "
              f"(sparsity {c['sparsity']:.4f}), {c['nodes']} writer nodes")
    return 0
