"""The fused steering op against the runtime's composite path (bit for bit), a closed-form oracle of the
lambdas, its fake implementation, torch.compile (one node, one graph) and, where Triton is installed,
the Triton kernel in Triton's CPU interpreter."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters

from dsas_diffusion.core.fused import MapTerms, float32_below, gate_logits, map_terms, op_args, steer_layer
from dsas_diffusion.core.gate import activate
from dsas_diffusion.core.hooks import as_tokens
from dsas_diffusion.core.maps import ITIC, LinearAcT, MeanShift
from dsas_diffusion.core.runtime import layer_lambdas, positions

B, D = 3, 8
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def maps(g: torch.Generator) -> dict:
    """Every map form: a constant shift, the clamped, identity-outside and unclamped affine maps of Linear-AcT."""
    beta, alpha = 1 + 0.5 * torch.randn(D, generator=g), torch.randn(D, generator=g)
    lo = -0.5 - torch.rand(D, generator=g)
    return {"shift": MeanShift(shift=torch.randn(D, generator=g)),
            "affine_clamped": LinearAcT(beta=beta, alpha=alpha, lo=lo, hi=lo + 1.2),
            "affine_inside": LinearAcT(beta=beta, alpha=alpha, lo=lo, hi=lo + 1.2, outside_source_range="identity"),
            "affine": LinearAcT(beta=beta, alpha=alpha, lo=torch.full((D,), -torch.inf),
                                hi=torch.full((D,), torch.inf)),
            "iti": ITIC(shift=torch.randn(D, generator=g))}


def situations(g: torch.Generator):
    """(name, x (B, K, D) float32, kind, positions() arguments, prior mean): every path through the gate."""
    def x(k):
        return 2 * torch.randn(B, k, D, generator=g)

    left_pad = torch.ones(B, 6, dtype=torch.bool)
    left_pad[1, :2] = False
    left_pad[2, :5] = False
    counts = torch.tensor([3.0, 1.0, 6.0]).view(B, 1, 1)
    means = torch.randn(B, 1, 1, generator=g)
    new_valid = torch.tensor([[True], [False], [True]])
    rows = torch.tensor([1.0, 0.0, 1.0])
    yield "prefill", x(6), "tokens", {}, None
    yield "prefill, padded, skip first", x(6), "tokens", dict(valid=left_pad, skip_first=True), None
    yield "prefill, rows", x(5), "tokens", dict(rows=rows), None
    yield "one token, first", x(1), "tokens", dict(skip_first=True), None
    yield "decode step", x(1), "tokens", dict(prior_count=counts, starts=False), means
    yield "decode step, padded row", x(1), "tokens", dict(valid=new_valid, prior_count=counts, starts=False), means
    yield "chunk after cache", x(4), "tokens", dict(prior_count=counts, starts=False), means
    yield "spatial", as_tokens(x(6).view(B, 2, 3, D).permute(0, 3, 1, 2))[0], "spatial", dict(rows=rows), None


def runtime_path(x, weight, bias, map_, pos, strength, gating, kind, floor, prior_mean):
    """SteeringHandle._on_output's gated path without the op, as plain ops: the reference (the gate in float32)."""
    proj = F.linear(x.float(), weight, bias)
    lam, (mean, _) = layer_lambdas(proj, pos, gating=gating, kind=kind, floor=floor, prior_mean=prior_mean)
    scale = lam if lam.dtype == x.dtype else lam.to(x.dtype)
    return torch.addcmul(x, scale, map_.delta(x), value=strength), lam, mean, proj


def oracle_lambdas(proj, gating, kind, floor, activation, valid=None, skip_first=False, prior_count=None,
                   starts=True, rows=None, prior_mean=None):
    """Lambdas and the running mean from the logits, one position at a time in float64 (method doc)."""
    b, k = proj.shape[:2]
    p = proj.double().view(b, k)
    v = torch.ones(b, k, dtype=torch.bool) if valid is None else valid
    lam, means = torch.zeros(b, k, dtype=torch.float64), torch.zeros(b, dtype=torch.float64)
    skip = skip_first and starts and kind != "spatial"  # the first real token: neither steered nor counted
    for i in range(b):
        n = 0.0 if prior_count is None else prior_count[i].item()
        total = 0.0 if prior_mean is None else prior_mean[i].item() * n
        causal, seen, real = [], [], 0
        for j in range(k):
            real += int(v[i, j])
            counted = float(v[i, j] and not (skip and real == 1))
            n += counted
            total += p[i, j].item() * counted
            causal.append(total / max(n, 1.0))
            seen.append(n)
        means[i] = total / max(n, 1.0)
        for j in range(k):
            if gating == "causal" and kind != "spatial":
                logit = causal[j]
            elif gating == "token" and v[i, j] and not (skip and sum(v[i, :j + 1]) == 1):
                logit = p[i, j].item()
            else:
                logit = means[i].item()
            lam[i, j] = activate(torch.tensor(logit, dtype=torch.float64), activation)
            if lam[i, j] < floor:
                lam[i, j] = 0.0
            if starts and (skip or valid is not None) and seen[j] == 0:  # leading padding, the skipped token
                lam[i, j] = 0.0
        if rows is not None:
            lam[i] *= rows[i]
    return lam, means


def cast(map_, weight, bias, dtype):
    return map_.to(None, dtype), weight.float().view(1, -1), bias.float().view(1)  # the gate stays float32


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("gating", ["token", "sequence", "causal"])
def test_op_is_the_composite_bit_for_bit(gating, dtype):
    """`steer_layer` (eager on the CPU: the composite called directly) and the op itself, for every map form,
    situation and lambda floor, give exactly what the runtime's ops gave, with x's strides."""
    g = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(D, generator=g), torch.randn((), generator=g)
    for map_name, map32 in maps(g).items():
        for name, x, kind, kw, prior_mean in situations(g):
            x = x.to(dtype)
            map_, w, b = cast(map32, weight, bias, dtype)
            for floor in (0.0, 0.4) if dtype == torch.float32 else (0.4,):  # (half-precision CPU linear is slow)
                pos = positions(B, x.shape[1], "cpu", gating=gating, kind=kind, **kw)
                want = runtime_path(x, w, b, map_, pos, 1.5, gating, kind, floor, prior_mean)
                options = dict(gating=gating, kind=kind, floor=floor, prior_mean=prior_mean)
                direct = steer_layer(x, w, b, torch.tensor(1.5), map_terms(map_), pos, **options)
                op = torch.ops.dsas.steer_layer(*op_args(x, w, b, torch.tensor(1.5), map_terms(map_), pos, **options))
                for how, got in (("direct", direct), ("op", op)):
                    where = f"{how}: {map_name}, {name}, floor {floor}"
                    assert got[0].stride() == x.stride(), where
                    for part, a, e in zip(("out", "lam", "mean", "proj"), got, want):
                        assert torch.equal(a, e.expand_as(a)), f"{part} differs, {where}"


@pytest.mark.parametrize("activation", ["sigmoid", "relu"])
@pytest.mark.parametrize("gating", ["token", "sequence", "causal"])
def test_lambdas_match_the_closed_form(gating, activation):
    g = torch.Generator().manual_seed(1)
    weight, bias = torch.randn(D, generator=g), torch.randn((), generator=g)
    map_, w, b = cast(maps(g)["shift"], weight, bias, torch.float32)
    for name, x, kind, kw, prior_mean in situations(g):
        pos = positions(B, x.shape[1], "cpu", gating=gating, kind=kind, **kw)
        got = steer_layer(x, w, b, torch.tensor(1.0), map_terms(map_), pos, gating=gating, kind=kind,
                          floor=0.3, prior_mean=prior_mean, activation=activation)
        lam, mean = oracle_lambdas(got.proj, gating, kind, 0.3, activation, prior_mean=prior_mean, **kw)
        torch.testing.assert_close(got.lam.squeeze(-1).double(), lam, rtol=1e-6, atol=1e-6, msg=name)
        torch.testing.assert_close(got.mean.view(-1).double(), mean, rtol=1e-6, atol=1e-6, msg=name)
        assert torch.equal(got.proj, (x @ w.view(-1) + b).unsqueeze(-1)), name


def test_unclamped_affine_terms_and_unknown_maps():
    """LinEAS's form (an affine map with no range) needs no clamp; a family without a fused form says so."""
    g = torch.Generator().manual_seed(2)
    x, slope, shift = torch.randn(B, 4, D, generator=g), torch.randn(D, generator=g), torch.randn(D, generator=g)
    w, b = torch.randn(1, D, generator=g), torch.randn(1, generator=g)
    pos = positions(B, 4, "cpu", gating="token")
    got = steer_layer(x, w, b, torch.tensor(0.7), MapTerms(shift, slope), pos, gating="token")
    assert torch.equal(got.out, torch.addcmul(x, got.lam, torch.addcmul(shift, slope, x), value=0.7))
    assert map_terms(object()) is None


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_a_shift_per_row_is_the_composite_bit_for_bit(dtype):
    """A (B, 1, D) shift (a spatial mean transported: core/runtime.py) through the function and the op."""
    g = torch.Generator().manual_seed(6)
    x = as_tokens(torch.randn(B, D, 2, 3, generator=g).to(dtype))[0]
    w, b = torch.randn(1, D, generator=g), torch.randn(1, generator=g)
    shift = torch.randn(B, 1, D, generator=g).to(dtype)
    pos = positions(B, x.shape[1], "cpu", gating="sequence", kind="spatial", rows=torch.tensor([1.0, 0.0, 1.0]))
    got = steer_layer(x, w, b, torch.tensor(1.5), MapTerms(shift), pos, gating="sequence", kind="spatial")
    op = torch.ops.dsas.steer_layer(*op_args(x, w, b, torch.tensor(1.5), MapTerms(shift), pos, gating="sequence",
                                             kind="spatial"))
    want = torch.addcmul(x, got.lam.to(dtype), shift, value=1.5)
    assert torch.equal(got.out, want) and torch.equal(op[0], want) and torch.equal(want[1], x[1])


@pytest.mark.parametrize("floor", [0.9, 0.5, 1.0, 0.1, 1 / 3, 1e-8, 1e-50])
def test_the_floor_in_one_op_zeroes_exactly_what_lam_below_floor_does(floor):
    """`torch.threshold` at the float32 just below the floor, against the two ops it replaced, bit for bit:
    on values at and around the floor (its float32 neighbours) and on random ones."""
    f = torch.tensor(floor, dtype=torch.float32)
    near = torch.stack([torch.nextafter(f, torch.tensor(-1.0)), f, torch.nextafter(f, torch.tensor(2.0))])
    lam = torch.cat([near, torch.rand(10000, generator=torch.Generator().manual_seed(0)),
                     torch.tensor([0.0, -0.0, 1.0, float("nan")])])
    got, want = torch.threshold(lam, float32_below(floor), 0.0), lam.masked_fill(lam < floor, 0.0)
    assert torch.equal(got.view(torch.int32), want.view(torch.int32))


def test_gate_logits_on_any_layout_and_dtype():
    """addmv for a contiguous float32 x, F.linear otherwise: the same logits to float rounding, (B, K, 1) float32."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 5, 8, generator=g)
    weight, bias = torch.randn(1, 8, generator=g), torch.randn(1, generator=g)
    for tokens in (x[:, 0], as_tokens(x.permute(0, 3, 1, 2))[0], x[:, 0].to(torch.bfloat16)):
        got = gate_logits(tokens, weight, bias)
        assert got.shape == (*tokens.shape[:2], 1) and got.dtype == torch.float32
        torch.testing.assert_close(got, F.linear(tokens.float(), weight, bias))


def test_fake_implementation_matches_the_real_one():
    """opcheck runs the op under FakeTensorMode and AOT dispatch and compares shapes, dtypes and strides."""
    g = torch.Generator().manual_seed(3)
    dtypes = {"prefill, padded, skip first": torch.float32, "decode step, padded row": torch.float16,
              "spatial": torch.bfloat16}
    forms = {"prefill, padded, skip first": "affine_inside", "decode step, padded row": "affine_clamped",
             "spatial": "affine_inside"}
    weight, bias = torch.randn(D, generator=g), torch.randn((), generator=g)
    for name, x, kind, kw, prior_mean in situations(g):
        if name in dtypes:
            map_, w, b = cast(maps(g)[forms[name]], weight, bias, dtypes[name])
            pos = positions(B, x.shape[1], "cpu", gating="token", kind=kind, **kw)
            args = op_args(x.to(dtypes[name]), w, b, torch.tensor(2.0), map_terms(map_), pos, gating="token",
                           kind=kind, prior_mean=prior_mean)
            torch.library.opcheck(torch.ops.dsas.steer_layer.default, args,
                                  test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


@pytest.mark.parametrize("via", ["steer_layer", "op"])
def test_compile_makes_one_graph_across_strengths_and_steps(via):
    """A compiled decoding step builds one graph, with no break, for any strength and running state, and gives
    what eager gives. On the CPU `steer_layer` lets Dynamo trace the composite; the op itself is one node."""
    g = torch.Generator().manual_seed(4)
    map_, w, b = cast(maps(g)["affine_clamped"], torch.randn(D, generator=g), torch.randn((), generator=g),
                      torch.float32)
    terms = map_terms(map_)

    def step(x, strength, mean, count):
        pos = positions(B, 1, x.device, gating="sequence", prior_count=count, starts=False)
        if via == "op":
            return torch.ops.dsas.steer_layer.default(*op_args(x, w, b, strength, terms, pos, gating="sequence",
                                                                prior_mean=mean))
        return steer_layer(x, w, b, strength, terms, pos, gating="sequence", prior_mean=mean)

    graphs = []

    def backend(gm, inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(step, backend=backend)
    mean, count = torch.zeros(B, 1, 1), torch.ones(B, 1, 1)
    with torch.no_grad():
        for s in (1.0, 0.5, 2.0, 1.0):
            x = torch.randn(B, 1, D, generator=g)
            got, want = compiled(x, torch.tensor(s), mean, count), step(x, torch.tensor(s), mean, count)
            assert all(torch.equal(a, e) for a, e in zip(got, want))
            mean, count = got[2], count + 1
    assert len(graphs) == 1 and not counters["graph_break"]
    op = torch.ops.dsas.steer_layer
    nodes = [n for n in graphs[0].graph.nodes if n.target in (op, op.default)]
    assert len(nodes) == (via == "op")


def test_training_runs_the_composite_with_gradients():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(B, 4, D, generator=g, requires_grad=True)
    w = torch.randn(1, D, generator=g, requires_grad=True)
    pos = positions(B, 4, "cpu", gating="causal")
    got = steer_layer(x, w, torch.zeros(1), torch.tensor(1.0), MapTerms(torch.randn(D, generator=g)), pos,
                      gating="causal")
    got.out.sum().backward()
    assert w.grad is not None and w.grad.abs().sum() > 0


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")
def test_triton_kernel_in_the_interpreter():
    """The CUDA kernel run by Triton's CPU interpreter against the composite (benchmarks/fused_check.py)."""
    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, TRITON_INTERPRET="1")
    command = [sys.executable, "-m", "benchmarks.fused_check", "--interpret", "--dtypes", "float32",
               "--maps", "affine clamped", "affine inside", "shift per row"]
    run = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]


@pytest.mark.parametrize("gating", ["token", "sequence", "causal"])
def test_an_empty_batch_or_no_positions_gives_empty_results_and_keeps_the_state(gating):
    """B = 0 or K = 0 (an empty batch, a call with no new token) steers nothing and fails nowhere; a causal
    running mean stays what it was, so the next decoding step reads it (it came back as (B, 0, 1))."""
    d = 5
    w, b, terms = torch.randn(1, d), torch.randn(1), MapTerms(torch.randn(d))
    for bsz, k in ((0, 4), (2, 0)):
        x = torch.randn(bsz, k, d)
        out, lam, _, proj = steer_layer(x, w, b, 1.0, terms, positions(bsz, k, "cpu", gating=gating), gating=gating)
        assert out.shape == x.shape and lam.shape == proj.shape == (bsz, k, 1)
        assert gate_logits(x, w, b).shape == (bsz, k, 1)
    prior_mean, prior_count = torch.tensor([0.7, -0.3]).view(2, 1, 1), torch.tensor([3.0, 4.0]).view(2, 1, 1)
    pos = positions(2, 0, "cpu", gating=gating, prior_count=prior_count, starts=False)
    lam, (mean, count) = layer_lambdas(torch.zeros(2, 0, 1), pos, gating=gating, prior_mean=prior_mean)
    assert lam.shape == (2, 0, 1)
    torch.testing.assert_close(mean, prior_mean)
    assert torch.equal(count, prior_count)


@pytest.mark.parametrize("gating", ["token", "sequence", "causal"])
def test_nan_or_inf_at_padding_stays_out_of_real_positions_and_the_state(gating):
    """Padding was taken out of the means by multiplying its logits by 0, and NaN * 0 is NaN: a padding position
    whose activations are NaN or inf (a row of attention masked out entirely) made every real lambda of a pooled
    row and the running state NaN. Selected out, the real positions get what they get with the padding zeroed."""
    from dsas_diffusion.core.hooks import masked_mean

    g = torch.Generator().manual_seed(5)
    d = 4
    valid = torch.tensor([[True, True, True, False, False], [False, False, True, True, True]])
    x = torch.randn(2, 5, d, generator=g)
    w, b, terms = torch.randn(1, d, generator=g), torch.randn(1, generator=g), MapTerms(torch.randn(d, generator=g))
    clean = steer_layer(x, w, b, 1.0, terms, positions(2, 5, "cpu", gating=gating, valid=valid), gating=gating)
    for bad in (float("nan"), float("inf")):
        dirty = x.clone()
        dirty[~valid] = bad
        got = steer_layer(dirty, w, b, 1.0, terms, positions(2, 5, "cpu", gating=gating, valid=valid), gating=gating)
        assert torch.equal(got.lam[valid], clean.lam[valid]) and torch.equal(got.out[valid], clean.out[valid])
        assert torch.equal(got.mean, clean.mean)
        assert torch.equal(masked_mean(dirty, valid), masked_mean(x, valid))


def test_compiling_a_lambda_floor_warns_about_nothing():
    """The floor's float32 neighbour is cached eagerly; traced, Dynamo warned at every compile that it skipped
    the cache wrapper."""
    import warnings

    from dsas_diffusion.core.fused import lambdas

    from tests.graph_counts import counting

    pos = positions(2, 3, "cpu", gating="token")
    proj = torch.randn(2, 3, 1, generator=torch.Generator().manual_seed(0))
    with counting() as compiled, warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        f = torch.compile(lambda p: lambdas(p, pos, gating="token", floor=0.3)[0], backend=compiled.backend,
                          fullgraph=True)
        got = f(proj)
    assert not [w for w in seen if "lru_cache" in str(w.message)]
    assert compiled.graphs == 1 and not compiled.breaks
    assert torch.equal(got, lambdas(proj, pos, gating="token", floor=0.3)[0])
