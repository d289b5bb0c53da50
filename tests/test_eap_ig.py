"""EAP-IG-inputs (``eap-ig``), EAP-IG-activations (``eap-ig-act``) and mask-space IG (``eap-mask-ig``).

The two EAP-IG methods run on the masked engine through a rebuilt corrupted cache (methods/eap.py).
Here each is checked against a slow, plainly written reference on the Hugging Face model itself:
forward hooks replace the input to block 0 or a node's output, every reader's input gradient is
read off the model (a zero tensor added to the projection outputs, the MLP norm's input and the
final norm's input, then pulled back through that reader's own norm and projection columns), and
the steps are an explicit loop, all in float64. Also: ``eap-mask-ig`` keeps the earlier ``eap-ig``'s
numbers, the points sit where the reference library puts them, and EAP-IG-inputs' integrated
gradients add up to the metric difference along the input path.
"""
import pytest
import torch

from circuitbench import MaskedModel, load_model
from circuitbench.errors import UserError
from circuitbench.method import CostMeter
from circuitbench.tasks.base import Examples
from methods.eap import (EAP, EAPIG, EAPIGActivations, EAPMaskIG, Interpolation, activation_alphas, input_alphas,
                         interpolated_scores)
from methods_support import SyntheticTask, make_examples

RTOL = 1e-6  # the scores come back as float32: float64 runs agree to ~3e-8 of the largest score


def _float64_norms(model):
    """transformers' RMSNorms compute in float32 even on float64 inputs; compute in the input dtype
    (the engine calls the same modules, so both sides use this)."""
    for mod in model.hf_model.modules():
        if type(mod).__name__.endswith("RMSNorm"):
            def forward(x, mod=mod):
                return mod.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + mod.variance_epsilon))
            mod.forward = forward


@pytest.fixture(scope="module", params=["random:gpt2-tiny", "random:llama-tiny", "random:neox-tiny"])
def tiny64(request):
    model = load_model(request.param, dtype=torch.float64)
    _float64_norms(model)
    return model, MaskedModel(model)


# ---- the reference: the Hugging Face model with hooks ------------------------------------------------
class Reference:
    """Runs of the Hugging Face model with a node's output (or the input to block 0) replaced by a
    given tensor, returning every writer's output and every reader's input gradient."""

    def __init__(self, model):
        self.model, self.hf, self.g = model, model.hf_model, model.graph
        self.gpt2, self.neox = model.family == "gpt2", model.family == "neox"
        self.dh = model.adapter.head_dim

    def blocks(self):
        if self.neox:
            return self.hf.gpt_neox.layers
        return self.hf.transformer.h if self.gpt2 else self.hf.model.layers

    def parts(self, blk):
        """(attention norm, [projections], output projection, MLP norm, MLP) of one block."""
        if self.gpt2:
            return blk.ln_1, [blk.attn.c_attn], blk.attn.c_proj, blk.ln_2, blk.mlp
        if self.neox:  # one fused query_key_value; attention and MLP read the same residual (parallel)
            at = blk.attention
            return blk.input_layernorm, [at.query_key_value], at.dense, blk.post_attention_layernorm, blk.mlp
        at = blk.self_attn
        return blk.input_layernorm, [at.q_proj, at.k_proj, at.v_proj], at.o_proj, blk.post_attention_layernorm, blk.mlp

    def head_outputs(self, o_proj, z):
        H, dh = self.g.n_heads, self.dh
        if self.gpt2:  # Conv1D: z @ W with W [in, out]
            return [z[..., h * dh:(h + 1) * dh] @ o_proj.weight[h * dh:(h + 1) * dh] for h in range(H)]
        return [z[..., h * dh:(h + 1) * dh] @ o_proj.weight[:, h * dh:(h + 1) * dh].T for h in range(H)]

    def attn_bias(self, layer):
        b = self.parts(self.blocks()[layer])[2].bias
        return 0.0 if b is None else b.detach()

    def reader_columns(self):
        """Per attention reader of a layer, in the graph's reader order: (projection index, columns)."""
        H, G, dh, d = self.g.n_heads, self.g.kv_heads, self.dh, self.model.adapter.d_model
        cols = lambda i, off=0: slice(off + i * dh, off + (i + 1) * dh)
        if self.gpt2:  # one c_attn: q, k, v blocks of d columns
            return ([(0, cols(h)) for h in range(H)] + [(0, cols(h, d)) for h in range(H)]
                    + [(0, cols(h, 2 * d)) for h in range(H)])
        if self.neox:  # one query_key_value viewed [..., heads, 3 * dh]: each head's q, k, v in turn
            return ([(0, cols(3 * h)) for h in range(H)] + [(0, cols(3 * h + 1)) for h in range(H)]
                    + [(0, cols(3 * h + 2)) for h in range(H)])
        return [(0, cols(h)) for h in range(H)] + [(1, cols(q)) for q in range(G)] + [(2, cols(q)) for q in range(G)]

    def run(self, task, batch, ids, replace=None, grads=False):
        """One forward on ``ids``. ``replace``: ("input", t) for the input to block 0, ("attn", l, t)
        for layer l's attention output (all heads and the output bias), ("mlp", l, t). Returns the
        writer outputs {name: [B, S, d]} and, with ``grads``, the reader input gradients [R, B, S, d]
        of ``task.objective`` summed over the batch."""
        outs, hooks, leaves, resid = {}, [], {}, {}
        kind = None if replace is None else replace[0]

        def block0(mod, args):
            outs["input"] = args[0].detach()
            if kind == "input":
                return (replace[1],) + args[1:]
        hooks.append(self.blocks()[0].register_forward_pre_hook(block0))
        for l, blk in enumerate(self.blocks()):
            norm1, projs, o_proj, norm2, mlp = self.parts(blk)

            def heads(mod, args, l=l, o_proj=o_proj):
                for h, y in enumerate(self.head_outputs(o_proj, args[0])):
                    outs[f"a{l}.h{h}"] = y.detach()
            hooks.append(o_proj.register_forward_pre_hook(heads))
            if kind == "attn" and replace[1] == l:
                hooks.append(o_proj.register_forward_hook(lambda mod, a, out: replace[2]))

            def mlp_out(mod, args, out, l=l):
                outs[f"m{l}"] = out.detach()
                if kind == "mlp" and replace[1] == l:
                    return replace[2]
            hooks.append(mlp.register_forward_hook(mlp_out))
            if grads:
                hooks.append(norm1.register_forward_pre_hook(lambda mod, a, l=l: resid.__setitem__(l, a[0].detach())))
                for i, proj in enumerate(projs):
                    def add_leaf(mod, args, out, key=(l, i)):
                        leaves[key] = torch.zeros_like(out, requires_grad=True)
                        return out + leaves[key]
                    hooks.append(proj.register_forward_hook(add_leaf))

                def mlp_leaf(mod, args, l=l):
                    leaves[("m", l)] = torch.zeros_like(args[0], requires_grad=True)
                    return (args[0] + leaves[("m", l)],) + args[1:]
                hooks.append(norm2.register_forward_pre_hook(mlp_leaf))
        if grads:
            final = (self.hf.gpt_neox.final_layer_norm if self.neox
                     else self.hf.transformer.ln_f if self.gpt2 else self.hf.model.norm)

            def logits_leaf(mod, args):
                leaves["logits"] = torch.zeros_like(args[0], requires_grad=True)
                return (args[0] + leaves["logits"],) + args[1:]
            hooks.append(final.register_forward_pre_hook(logits_leaf))
        try:
            with torch.set_grad_enabled(grads):
                logits = self.hf(ids, attention_mask=batch.attention_mask).logits
                if grads:
                    at = logits[torch.arange(len(ids))[:, None], batch.positions]
                    keys = list(leaves)
                    got = torch.autograd.grad(task.objective(at, batch).sum(), [leaves[k] for k in keys],
                                              allow_unused=True)
                    grad = {k: torch.zeros_like(leaves[k]) if v is None else v for k, v in zip(keys, got)}
        finally:
            for h in hooks:
                h.remove()
        if not grads:
            return outs, None
        readers = []
        for l, blk in enumerate(self.blocks()):
            norm1, projs, *_ = self.parts(blk)
            for i, cols in self.reader_columns():
                # the reader's input feeds only its own columns: pull their gradient back through the
                # layer's norm and projection
                x = resid[l].clone().requires_grad_(True)
                (g,) = torch.autograd.grad(projs[i](norm1(x))[..., cols], x, grad_outputs=grad[(l, i)][..., cols])
                readers.append(g)
            readers.append(grad[("m", l)])
        readers.append(grad["logits"])
        return outs, torch.stack(readers)

    def stack(self, outs):
        return torch.stack([outs[name] for name in self.g.writer_names])

    def scores(self, delta, reader_grads):
        """(y~ - y) . G, summed over examples, tokens and features: [W, R] on the graph's edges."""
        return torch.einsum("wbsd,rbsd->wr", delta, reader_grads) * self.g.valid


def reference_eap_ig(model, task, batch, steps):
    ref = Reference(model)
    clean, _ = ref.run(task, batch, batch.clean)
    corr, _ = ref.run(task, batch, batch.corrupted)
    delta = ref.stack(corr) - ref.stack(clean)
    total = 0.0
    for k in range(steps):  # the library's points: k / m, k = 0 .. m - 1
        emb = corr["input"] + (k / steps) * (clean["input"] - corr["input"])
        _, grads = ref.run(task, batch, batch.clean, replace=("input", emb), grads=True)
        total = total + ref.scores(delta, grads)
    return total / steps


def reference_eap_ig_act(model, task, batch, steps, zero=False):
    ref = Reference(model)
    g = model.graph
    clean, _ = ref.run(task, batch, batch.clean)
    corr = ({k: torch.zeros_like(v) for k, v in clean.items()} if zero
            else ref.run(task, batch, batch.corrupted)[0])
    delta = ref.stack(corr) - ref.stack(clean)
    # each node's clean and corrupted output: the input, a layer's attention (its heads and the
    # output bias, which is never ablated), an MLP
    nodes = [("input", clean["input"], corr["input"])]
    for l in range(g.n_layers):
        heads = [f"a{l}.h{h}" for h in range(g.n_heads)]
        bias = ref.attn_bias(l)
        nodes.append(("attn", l, bias + sum(clean[h] for h in heads), bias + sum(corr[h] for h in heads)))
        nodes.append(("mlp", l, clean[f"m{l}"], corr[f"m{l}"]))
    total, runs = 0.0, 0
    for *node, y, ytil in nodes:
        for k in range(1, steps + 1):  # the library's points: k / m, k = 1 .. m
            out = ytil + (k / steps) * (y - ytil)
            _, grads = ref.run(task, batch, batch.clean, replace=(*node, out), grads=True)
            total = total + ref.scores(delta, grads)
            runs += 1
    return total / runs


def _close(got, want, rtol=RTOL):
    scale = float(want.abs().max())
    err = float((got.double() - want).abs().max())
    assert scale > 0 and err <= rtol * scale, f"max error {err:.3g} against max |score| {scale:.3g}"


# ---- the methods against the reference ------------------------------------------------------------
def test_eap_ig_equals_input_interpolation_on_the_hf_model(tiny64):
    model, eng = tiny64
    task, train = SyntheticTask(), make_examples(6)
    res = EAPIG(steps=3, batch_size=4).discover(eng, task, train, None, [], progress=False)  # two batches
    want = reference_eap_ig(model, task, train, 3)
    _close(res.scores, want)
    assert res.info["alphas"] == [0.0, 1 / 3, 2 / 3]
    # the interpolation matters: these are not EAP's scores
    eap = EAP(batch_size=4).discover(eng, task, train, None, [], progress=False).scores.double()
    assert float((want - eap).abs().max()) > 1e-2 * float(eap.abs().max())
    # per batch: corrupted and clean passes, 3 gradient passes, 2 no-grad passes (a = 0 needs none)
    assert res.cost.forward_passes == 2 * (2 + 3 + 2) and res.cost.backward_passes == 2 * 3


@pytest.mark.parametrize("ablation", ["interchange", "zero"])
def test_eap_ig_act_equals_node_interpolation_on_the_hf_model(tiny64, ablation):
    model, eng = tiny64
    task, train = SyntheticTask(ablation), make_examples(6)
    res = EAPIGActivations(steps=2, batch_size=4).discover(eng, task, train, None, [], progress=False)
    want = reference_eap_ig_act(model, task, train, 2, zero=ablation == "zero")
    _close(res.scores, want)
    assert res.info["alphas"] == [0.5, 1.0]
    n_nodes = 1 + 2 * model.graph.n_layers
    # per batch and node: one gradient pass per point, a no-grad pass for a < 1 except for the nodes only
    # the logits read (the last MLP; in a parallel block also the last attention, which its MLP does not read)
    last = 2 if model.graph.parallel else 1
    fwd = 1 + (ablation == "interchange") + n_nodes * 2 + (n_nodes - last)
    assert res.cost.forward_passes == 2 * fwd and res.cost.backward_passes == 2 * 2 * n_nodes


def test_padded_batches_match_the_reference(tiny64):
    """Right padding (rows of different lengths, scored before their padding) changes nothing."""
    model, eng = tiny64
    task, train = SyntheticTask(), make_examples(4, seq=7)
    mask, pos = train.attention_mask.clone(), train.positions.clone()
    mask[0, 5:], mask[2, 4:] = 0, 0
    pos[0], pos[2] = 4, 3
    padded = Examples(clean=train.clean, corrupted=train.corrupted, attention_mask=mask, positions=pos,
                      targets=train.targets, texts=train.texts)
    _close(EAPIG(steps=2).discover(eng, task, padded, None, [], progress=False).scores,
           reference_eap_ig(model, task, padded, 2))
    _close(EAPIGActivations(steps=2).discover(eng, task, padded, None, [], progress=False).scores,
           reference_eap_ig_act(model, task, padded, 2))


def test_the_points_are_the_reference_librarys():
    assert input_alphas(5) == [0.0, 0.2, 0.4, 0.6, 0.8]
    assert activation_alphas(5) == [0.2, 0.4, 0.6, 0.8, 1.0]


def test_eap_ig_at_the_clean_point_alone_is_eap_exactly(tiny64):
    model, eng = tiny64
    task, train = SyntheticTask(), make_examples(6)
    eap = EAP(batch_size=4).discover(eng, task, train, None, [], progress=False).scores
    one = interpolated_scores(eng, task, train, 4, [Interpolation(slice(0, 1), 1.0, cut=False)], CostMeter(),
                              progress=False)
    assert torch.equal(one, eap)


def test_eap_ig_with_one_step_is_the_corrupted_point(tiny64):
    """The library's points start at the corrupted end: with m = 1 the gradient is taken on the
    corrupted run, i.e. minus EAP with the clean and corrupted prompts swapped."""
    model, eng = tiny64
    task, train = SyntheticTask(), make_examples(6)
    ig1 = EAPIG(steps=1, batch_size=4).discover(eng, task, train, None, [], progress=False).scores
    swapped = Examples(clean=train.corrupted, corrupted=train.clean, attention_mask=train.attention_mask,
                       positions=train.positions, targets=train.targets, texts=train.texts)
    eap = EAP(batch_size=4).discover(eng, task, swapped, None, [], progress=False).scores
    _close(ig1, -eap.double(), rtol=1e-9)


def test_eap_ig_input_scores_integrate_to_the_metric_difference(tiny64):
    """Integrated gradients along the input path: summed over the edges out of the input node, the
    scores approximate int_0^1 (e~ - e) . grad f(e~ + a (e - e~)) da = f(corrupted) - f(clean)
    (summed over examples). The library's points are a left Riemann sum; adding the end
    correction (h(1) - h(0)) / 2m (h(1) from EAP, h(0) from one step) makes it the trapezoid
    rule, accurate to O(1/m^2). No such identity holds for the other rows, or for eap-ig-act."""
    _, eng = tiny64
    task, train = SyntheticTask(), make_examples(6)

    def input_row(method):  # the edges out of the input node, summed
        return float(method.discover(eng, task, train, None, [], progress=False).scores[0].double().sum())

    h1, h0 = input_row(EAP()), input_row(EAPIG(steps=1))
    with torch.no_grad():
        f = lambda ids: float(task.objective(eng.reference(ids, positions=train.positions), train).sum())
        target = f(train.corrupted) - f(train.clean)
    errors = []
    for m in (16, 32):
        left = input_row(EAPIG(steps=m))
        trapezoid = left + (h1 - h0) / (2 * m)
        assert abs(trapezoid - target) < abs(left - target)
        errors.append(abs(trapezoid - target))
    assert errors[1] <= 2e-3 * abs(target), (errors, target)
    assert errors[1] <= errors[0] / 3  # second order: halving the step quarters the error


def test_eap_ig_needs_interchange_ablation(tiny64):
    _, eng = tiny64
    with pytest.raises(UserError, match="interchange ablation"):
        EAPIG(steps=2).discover(eng, SyntheticTask("zero"), make_examples(4), None, [], progress=False)
    with pytest.raises(UserError, match="steps >= 1"):
        EAPIG(steps=0).discover(eng, SyntheticTask(), make_examples(4), None, [], progress=False)


# ---- eap-mask-ig: the earlier eap-ig, renamed ----------------------------------------------------------
def test_eap_mask_ig_is_the_mask_space_average(tiny64):
    """eap-mask-ig = minus the mean edge-mask gradient at every mask (k + 1/2) / m: the numbers the
    estimator called eap-ig gave before the rename."""
    model, eng = tiny64
    g = model.graph
    task, train = SyntheticTask(), make_examples(4)
    res = EAPMaskIG(steps=3).discover(eng, task, train, None, [], progress=False)
    want = torch.zeros(g.n_writers, g.n_readers, dtype=torch.float64)
    for alpha in (1 / 6, 1 / 2, 5 / 6):
        mask = (g.full_mask(torch.float64) * alpha).requires_grad_(True)
        out = eng(train.clean, train.corrupted, attention_mask=train.attention_mask, edge_mask=mask,
                  positions=train.positions)
        (grad,) = torch.autograd.grad(task.objective(out, train).sum(), mask)
        want -= grad / 3
    _close(res.scores, want * g.valid, rtol=1e-6)
    assert res.info["alphas"] == [1 / 6, 1 / 2, 5 / 6]


def test_edge_pruning_warm_starts_from_the_new_eap_ig(tiny64):
    from methods.edge_pruning import EdgePruning

    _, eng = tiny64
    res = EdgePruning(steps=2, ramp_steps=0, batch_size=4, warm_start="eap-ig").discover(
        eng, SyntheticTask(), make_examples(4), None, [0.75], progress=False)
    assert res.info["warm_start"] == "eap-ig" and "warm_start" in res.cost.wall_s
    assert res.circuits[0.75].n_edges > 0
