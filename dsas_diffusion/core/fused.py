"""One steering op per layer: gate logits, lambdas, map and blend as `torch.ops.dsas.steer_layer`.

Eager GPU inference at the sizes we steer is bound by kernel launches, so the dozen small ops
of the composite (a projection, the pooling, the sigmoid, the masks, the map, the blend) cost
about as much as real kernels. On CUDA with Triton they are one kernel launch (two when a row
has more than `_MAX_BLOCK_K` positions: the gate logits first, since a pooled or causal lambda
needs the logits of the whole row before any position is blended), and, as a custom op with a
fake implementation, one node for torch.compile.

The composite (`composite`, `lambdas`) is the reference and runs everywhere else: on the CPU,
eager or traced by torch.compile, for inputs that require grad, and on CUDA without Triton. Its
ops and their order are the runtime's, so it is bit-identical to it. The kernel covers every
gating mode, mask and map form the composite does; it accumulates in fp32 and rounds where the
composite rounds (the logits and the map to the activations' dtype): it agrees to float
rounding, not to the bit.
"""

from __future__ import annotations

import functools
import struct
from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.nn.functional as F

from .gate import activate
from .maps import SteeringMap

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU builds of torch: the composite runs everywhere
    triton = None

if TYPE_CHECKING:
    from .runtime import Positions


class MapTerms(NamedTuple):
    """A map as the op reads it: delta(x) = shift, or shift + slope * clamp(x, lo, hi) when `slope` is
    given (no clamp when lo and hi are None), or with `inside` shift + slope * x where lo <= x <= hi
    and 0 elsewhere (the identity outside the range). Tensors of shape (D,) in the activations' dtype;
    a shift alone may be (B, 1, D), one per row (a spatial mean transported, see core/runtime.py)."""

    shift: torch.Tensor
    slope: torch.Tensor | None = None
    lo: torch.Tensor | None = None
    hi: torch.Tensor | None = None
    inside: bool = False


def map_terms(map_: SteeringMap) -> MapTerms | None:
    """The fused form of a map (cast to the activations' device and dtype first), from the map's own
    `delta_form`, or None for a map that has none: a caller then applies `map_.delta` with the
    composite ops."""
    try:
        form = map_.delta_form()
    except (AttributeError, NotImplementedError):  # not a SteeringMap, or a family without a fused form
        return None
    if form[0] == "shift":
        return MapTerms(form[1])
    return MapTerms(*form[1:], inside=form[0] == "affine_inside")


class Steered(NamedTuple):
    """One layer's steered activations, and what the runtime keeps of its gate."""

    out: torch.Tensor  # (B, K, D) x + strength * lambda * delta(x), in x's dtype and strides
    lam: torch.Tensor  # (B, K, 1) float32 lambdas
    mean: torch.Tensor | None  # (B, 1, 1) float32 running mean of the logits after this call: the state is
    # (mean, pos.count); None from the composite called with state=False where the lambdas do not read it
    proj: torch.Tensor  # (B, K, 1) float32 gate logits, bias included


def lambdas(
    proj: torch.Tensor,
    pos: "Positions",
    *,
    gating: str,
    kind: str = "tokens",
    floor: float = 0.0,
    prior_mean: torch.Tensor | None = None,
    activation: str = "sigmoid",
    state: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One layer's lambdas (B, K, 1) from its gate logits `proj` (B, K, 1) (bias included), and the new
    running mean of the logits (B, 1, 1).

    The state is the running mean, not the sum: the pooled and causal logits are that mean
    already, so keeping it costs nothing, and a cached token moves it in one lerp. A caller that
    keeps no running state (`state=False`: a call that starts and ends its sequence, as every
    diffusion forward does) gets None instead where the lambdas do not read the mean (token gating
    without padding; causal gating, whose lambdas read the running means but not the copy of the
    last one), and saves its ops.
    """
    k = proj.shape[1]
    token = gating == "token"
    if not state and token and pos.pad is None:  # every lambda reads its own logit: the mean would go unread
        mean = None
        logits = proj
    elif pos.step is not None and prior_mean is not None:  # a cached decoding step
        mean = torch.lerp(prior_mean, proj, pos.step)
        logits = mean if not token else proj if pos.pad is None else torch.where(pos.pad, mean, proj)
    else:
        # selected, not multiplied by a 0 / 1 mask: the logit of a padding position may be NaN or inf (a row of
        # attention masked out entirely), and NaN * 0 is NaN, which then reached every real position
        pv = proj if pos.valid is None else torch.where(pos.valid, proj, 0.0)
        if gating == "causal" and kind != "spatial":
            run = pv if k == 1 else pv.cumsum(1)
            if prior_mean is not None:
                run = torch.addcmul(run, prior_mean, pos.prior)
            logits = run / pos.seen
            if not state:
                mean = None
            elif k == 0:  # no position: the running mean stays what it was
                mean = prior_mean if prior_mean is not None else proj.new_zeros(proj.shape[0], 1, 1)
            else:
                # the causal mean at the last position is the mean of all so far; copied to the layout of the
                # other modes' state, which a compiled graph reading it at the next step guards on
                mean = logits[:, -1:].clone(memory_format=torch.contiguous_format)
        else:
            total = pv if k == 1 else pv.sum(1, keepdim=True)
            if prior_mean is not None:
                total = torch.addcmul(total, prior_mean, pos.prior)
            mean = total / pos.divisor
            # images cannot be read causally: their mean decides, one lambda per row broadcast at the end
            logits = mean if not token else proj if pos.pad is None else torch.where(pos.pad, mean, proj)
    lam = activate(logits, activation)
    if floor > 0:  # lam < floor -> 0, in one op
        # traced, the plain function: Dynamo warns at every compile that it skips an lru_cache wrapper
        below = float32_below.__wrapped__(floor) if torch.compiler.is_compiling() else float32_below(floor)
        lam = torch.threshold(lam, below, 0.0)
    if pos.drop is not None:
        lam = lam.masked_fill(pos.drop, 0.0)
    if pos.rows is not None:
        lam = lam * pos.rows
    if lam.shape[1] != k:
        lam = lam.expand(-1, k, -1)
    return lam, mean


def steer_layer(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    strength: torch.Tensor | float,
    terms: MapTerms,
    pos: "Positions",
    *,
    gating: str,
    kind: str = "tokens",
    floor: float = 0.0,
    prior_mean: torch.Tensor | None = None,
    activation: str = "sigmoid",
    state: bool = True,
) -> Steered:
    """Steer one gated layer's activations `x` (B, K, D): see `Steered` for what comes back.

    `weight` (1, D) and `bias` (1,) are the gate's, in float32; `terms` the map's (`map_terms`), in x's
    dtype and on its device; `pos` is the call's `runtime.Positions`, shared by its layers.
    `strength` is a float or a 0-dim float32 tensor; compiled, pass a tensor, so the graph reads it
    rather than specialising on it (on CUDA keep it on x's device, where CUDA graphs read it too);
    eager on the CPU a float that is a float32 value costs one op less and gives the same bits.
    `state=False`: the caller keeps no running state (see `lambdas`), and `mean` may be None.

    On CUDA with Triton this is the kernel: under torch.compile through the op, one node; eager,
    called directly, as dispatching a Python custom op costs more than the composite's own ops.
    Everywhere else, and for inputs that require grad (the op has no backward), the composite runs
    directly, and torch.compile traces it: on a CPU, Inductor fuses it with its neighbours, which an
    opaque op would prevent [measured on this CPU, eager and compiled: the op was the slower].
    """
    if x.is_cuda and triton is not None and not _needs_grad(x, weight, bias, *terms):
        args = op_args(x, weight, bias, strength, terms, pos, gating=gating, kind=kind, floor=floor,
                       prior_mean=prior_mean, activation=activation)
        if torch.compiler.is_compiling():
            if not isinstance(strength, torch.Tensor):  # a constant of the graph
                args = (*args[:3], torch.tensor(float(strength)), *args[4:])
            return Steered(*torch.ops.dsas.steer_layer.default(*args))
        if x.numel():
            return Steered(*triton_steer(*args))
    return _composite(x, weight, bias, strength, terms, pos, gating, kind, floor, prior_mean, activation, state=state)


def op_args(x, weight, bias, strength, terms, pos, *, gating, kind="tokens", floor=0.0, prior_mean=None,
            activation="sigmoid") -> tuple:
    """`steer_layer`'s arguments as `torch.ops.dsas.steer_layer` takes them (tensors, then options; the op
    needs `strength` as a tensor, the kernel takes a float too)."""
    return (x, weight, bias, strength, *terms, pos.valid, pos.prior, pos.divisor, pos.step, pos.seen, pos.drop,
            pos.pad, pos.rows, prior_mean, gating, kind, float(floor), activation)


def _composite(x, weight, bias, strength, terms, pos, gating, kind, floor, prior_mean, activation, out=None,
               state=True):
    proj = gate_logits(x, weight, bias)
    lam, mean = lambdas(proj, pos, gating=gating, kind=kind, floor=floor, prior_mean=prior_mean,
                        activation=activation, state=state)
    shift, slope, lo, hi, inside = terms
    if slope is None:
        delta = shift
    elif lo is None:
        delta = torch.addcmul(shift, slope, x)
    elif inside:  # the ops of maps.LinearAcT.delta
        delta = torch.where((x >= lo) & (x <= hi), torch.addcmul(shift, slope, x), 0.0)
    else:
        delta = torch.addcmul(shift, slope, torch.clamp(x, lo, hi))
    kw = {} if out is None else {"out": out}
    if isinstance(strength, torch.Tensor):
        if strength.device.type != "cpu" or torch.compiler.is_compiling():  # read on the device, no synchronisation
            return Steered(torch.addcmul(x, (lam * strength).to(x.dtype), delta, **kw), lam, mean, proj)
        strength = strength.item()  # on the host: free, and the ops below are the runtime's exactly
    scale = lam if lam.dtype == x.dtype else lam.to(x.dtype)
    return Steered(torch.addcmul(x, scale, delta, value=strength, **kw), lam, mean, proj)


def composite(x, weight, bias, strength, shift, slope, lo, hi, inside, valid, prior, divisor, step, seen, drop, pad,
              rows, prior_mean, gating, kind, floor, activation):
    """The op in today's PyTorch ops (arguments as the op's): its CPU implementation and the reference.
    A strength tensor read on the device is folded into the scale, which is exact in float32 only."""
    from .runtime import Positions

    pos = Positions(valid, prior, None, divisor, step, seen, drop, pad, rows)
    terms = MapTerms(shift, slope, lo, hi, inside)
    res = _composite(x, weight, bias, strength, terms, pos, gating, kind, floor, prior_mean, activation,
                     out=torch.empty_like(x))  # x's strides, as the fake implementation promises
    return res.out, res.lam.contiguous(), res.mean.contiguous(), res.proj.contiguous()


def gate_logits(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """(B, K, 1) gate logits of activations `x` (B, K, D), bias included, in float32 whatever x's dtype (in
    bfloat16 the logits would move lambdas by up to 0.16). Eager, a contiguous x takes addmv: the gate has one
    output, and F.linear's way through a matrix product cost about 7 us more per call on this CPU, for a
    layer whose cached decoding step is a handful of ops. Traced, F.linear, which Inductor fuses."""
    if x.dtype is not weight.dtype:
        x = x.to(weight.dtype)
    if not torch.compiler.is_compiling() and x.dim() == 3 and x.is_contiguous() and x.numel():
        b, k, d = x.shape
        return torch.addmv(bias, x.view(b * k, d), weight.view(d)).view(b, k, 1)
    return F.linear(x, weight, bias)


@functools.lru_cache(maxsize=64)
def float32_below(floor: float) -> float:
    """The largest float32 below `floor` rounded to float32: `torch.threshold(lam, float32_below(f), 0)` zeroes a
    float32 lam exactly where `lam < f` does (which compares in float32), in one op where that took two."""
    bits = struct.unpack("<I", struct.pack("<f", floor))[0]
    if bits == 0:  # floor rounds to +0.0: the next float32 down is the smallest negative one
        bits = 0x80000001
    else:
        bits = bits - 1 if bits < 0x80000000 else bits + 1  # a positive float steps down its bits, a negative up
    return struct.unpack("<f", struct.pack("<I", bits))[0]


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors)


@torch.library.custom_op("dsas::steer_layer", mutates_args=())
def _steer_layer_op(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, strength: torch.Tensor,
    shift: torch.Tensor, slope: torch.Tensor | None, lo: torch.Tensor | None, hi: torch.Tensor | None, inside: bool,
    valid: torch.Tensor | None, prior: torch.Tensor | None, divisor: torch.Tensor, step: torch.Tensor | None,
    seen: torch.Tensor | None, drop: torch.Tensor | None, pad: torch.Tensor | None, rows: torch.Tensor | None,
    prior_mean: torch.Tensor | None, gating: str, kind: str, floor: float, activation: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return composite(x, weight, bias, strength, shift, slope, lo, hi, inside, valid, prior, divisor, step, seen, drop,
                     pad, rows, prior_mean, gating, kind, floor, activation)


@_steer_layer_op.register_fake
def _(x, *args):
    b, k = x.shape[:2]
    return (torch.empty_like(x), x.new_empty((b, k, 1), dtype=torch.float32),
            x.new_empty((b, 1, 1), dtype=torch.float32), x.new_empty((b, k, 1), dtype=torch.float32))


_MAX_BLOCK_K = 32  # positions per program; a row with more takes two launches
_TILE = 4096  # elements of x a program holds at once (BLOCK_K * BLOCK_D)
_ROW = 1024  # logits of a row a program sums at once when its block is not the whole row (BLOCK_R)

if triton is not None:

    @triton.jit
    def _logits(xrow, w_ptr, b_ptr, ks, K, D, sxk, sxd, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
        """Gate logits of positions `ks` in fp32, as the composite computes them (the gate is float32)."""
        acc = tl.zeros((BLOCK_K, BLOCK_D), tl.float32)
        for d0 in range(0, D, BLOCK_D):
            ds = d0 + tl.arange(0, BLOCK_D)
            m = (ks[:, None] < K) & (ds[None, :] < D)
            xv = tl.load(xrow + ks[:, None] * sxk + ds[None, :] * sxd, mask=m, other=0.0).to(tl.float32)
            acc += xv * tl.load(w_ptr + ds, mask=ds < D, other=0.0).to(tl.float32)[None, :]
        return tl.sum(acc, axis=1) + tl.load(b_ptr).to(tl.float32)

    # K is not specialised (prompt lengths vary: one compiled kernel serves them all)
    @triton.jit(do_not_specialize=["K"])
    def _logits_kernel(x_ptr, w_ptr, b_ptr, proj_ptr, K, D, sxb, sxk, sxd,
                       BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
        row = tl.program_id(0)
        ks = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
        proj = _logits(x_ptr + row.to(tl.int64) * sxb, w_ptr, b_ptr, ks, K, D, sxk, sxd, BLOCK_K, BLOCK_D)
        tl.store(proj_ptr + row.to(tl.int64) * K + ks, proj, mask=ks < K)

    @triton.jit(do_not_specialize=["K"])
    def _steer_kernel(
        x_ptr, w_ptr, b_ptr, s_arg, shift_ptr, slope_ptr, lo_ptr, hi_ptr,
        valid_ptr, prior_ptr, div_ptr, step_ptr, seen_ptr, drop_ptr, pad_ptr, rows_ptr, pm_ptr,
        out_ptr, lam_ptr, mean_ptr, proj_ptr,
        K, D, sxb, sxk, sxd, sob, sok, sod, floor,
        ONE_PASS: tl.constexpr, S_ON_DEVICE: tl.constexpr, AFFINE: tl.constexpr, CLAMP: tl.constexpr,
        INSIDE: tl.constexpr, ROW_SHIFT: tl.constexpr,
        HAS_VALID: tl.constexpr, HAS_PRIOR: tl.constexpr, DECODE: tl.constexpr, CAUSAL: tl.constexpr,
        TOKEN: tl.constexpr, HAS_DROP: tl.constexpr, HAS_PAD: tl.constexpr, HAS_ROWS: tl.constexpr,
        RELU: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
    ):
        """One program per (row, block of positions): the block's lambdas, then its blend over D."""
        row = tl.program_id(0)
        kb = tl.program_id(1)
        ks = kb * BLOCK_K + tl.arange(0, BLOCK_K)
        kin = ks < K
        xrow = x_ptr + row.to(tl.int64) * sxb
        at = row.to(tl.int64) * K  # offset of the row in the (B, K, 1) tensors
        if ONE_PASS:  # the block is the whole row: its logits are all there is
            proj = _logits(xrow, w_ptr, b_ptr, ks, K, D, sxk, sxd, BLOCK_K, BLOCK_D)
            tl.store(proj_ptr + at + ks, proj, mask=kin)
        else:
            proj = tl.load(proj_ptr + at + ks, mask=kin, other=0.0)
        if DECODE:  # one cached token (K == 1) moves the running mean
            pm = tl.load(pm_ptr + row)
            mean = pm + tl.load(step_ptr + row) * (tl.sum(tl.where(kin, proj, 0.0), axis=0) - pm)
            logits = proj if TOKEN else tl.zeros((BLOCK_K,), tl.float32) + mean
            tl.store(mean_ptr + row, mean, mask=kb == 0)
        else:
            if HAS_VALID:  # selected, as the composite does: a NaN logit of padding stays out
                pv = tl.where(tl.load(valid_ptr + at + ks, mask=kin, other=0) != 0, proj, 0.0)
            else:
                pv = tl.where(kin, proj, 0.0)
            if ONE_PASS:
                before = 0.0
                after = 0.0
            else:  # the other blocks' logits, from the buffer the first launch wrote
                acc_b = tl.zeros((BLOCK_R,), tl.float32)
                acc_a = tl.zeros((BLOCK_R,), tl.float32)
                for j0 in range(0, K, BLOCK_R):
                    js = j0 + tl.arange(0, BLOCK_R)
                    pj = tl.load(proj_ptr + at + js, mask=js < K, other=0.0)
                    if HAS_VALID:
                        pj = tl.where(tl.load(valid_ptr + at + js, mask=js < K, other=0) != 0, pj, 0.0)
                    acc_b += tl.where(js < kb * BLOCK_K, pj, 0.0)
                    acc_a += tl.where(js >= (kb + 1) * BLOCK_K, pj, 0.0)
                before = tl.sum(acc_b, axis=0)
                after = tl.sum(acc_a, axis=0)
            if HAS_PRIOR:
                carried = tl.load(pm_ptr + row) * tl.load(prior_ptr + row)
            else:
                carried = 0.0
            if CAUSAL:
                run = before + tl.cumsum(pv, axis=0) + carried
                logits = run / tl.load(seen_ptr + at + ks, mask=kin, other=1.0)
                last = tl.sum(tl.where(ks == K - 1, logits, 0.0), axis=0)  # the mean of all so far
                tl.store(mean_ptr + row, last, mask=(kb + 1) * BLOCK_K >= K)
            else:
                mean = (before + tl.sum(pv, axis=0) + after + carried) / tl.load(div_ptr + row)
                logits = proj if TOKEN else tl.zeros((BLOCK_K,), tl.float32) + mean
                tl.store(mean_ptr + row, mean, mask=kb == 0)
        if TOKEN:
            if HAS_PAD:  # padding takes the sequence decision
                logits = tl.where(tl.load(pad_ptr + at + ks, mask=kin, other=0) != 0, mean, logits)
        if RELU:
            lam = tl.minimum(tl.maximum(logits, 0.0), 1.0)
        else:
            lam = tl.sigmoid(logits)
        lam = tl.where(lam < floor, 0.0, lam)
        if HAS_DROP:
            lam = tl.where(tl.load(drop_ptr + at + ks, mask=kin, other=0) != 0, 0.0, lam)
        if HAS_ROWS:
            lam = lam * tl.load(rows_ptr + row)
        tl.store(lam_ptr + at + ks, lam, mask=kin)

        s = tl.load(s_arg).to(tl.float32) if S_ON_DEVICE else s_arg
        scale = s * lam.to(x_ptr.dtype.element_ty).to(tl.float32)
        orow = out_ptr + row.to(tl.int64) * sob
        if ROW_SHIFT:  # a (B, 1, D) shift: this row's
            srow = shift_ptr + row.to(tl.int64) * D
        else:
            srow = shift_ptr
        for d0 in range(0, D, BLOCK_D):
            ds = d0 + tl.arange(0, BLOCK_D)
            din = ds < D
            m = kin[:, None] & din[None, :]
            xv = tl.load(xrow + ks[:, None] * sxk + ds[None, :] * sxd, mask=m, other=0.0).to(tl.float32)
            delta = tl.load(srow + ds, mask=din, other=0.0).to(tl.float32)[None, :]
            if AFFINE:
                xc = xv
                if CLAMP:
                    lo = tl.load(lo_ptr + ds, mask=din, other=0.0).to(tl.float32)[None, :]
                    hi = tl.load(hi_ptr + ds, mask=din, other=0.0).to(tl.float32)[None, :]
                    if not INSIDE:
                        xc = tl.minimum(tl.maximum(xc, lo), hi)
                slope = tl.load(slope_ptr + ds, mask=din, other=0.0).to(tl.float32)[None, :]
                delta = (delta + slope * xc).to(x_ptr.dtype.element_ty).to(tl.float32)
                if CLAMP:
                    if INSIDE:  # the identity outside [lo, hi]
                        delta = tl.where((xv >= lo) & (xv <= hi), delta, 0.0)
            out = xv + scale[:, None] * delta
            tl.store(orow + ks[:, None] * sok + ds[None, :] * sod, out.to(out_ptr.dtype.element_ty), mask=m)

    def _flat(t: torch.Tensor | None, b: int, n: int, like: torch.Tensor) -> torch.Tensor:
        """A (B, n, 1) per-row or per-position tensor as the kernel indexes it; `like` stands in for None."""
        if t is None:
            return like
        if t.shape != (b, n, 1) or not t.is_contiguous():  # as positions() makes them, nothing to do
            t = t.expand(b, n, 1).contiguous()
        return t.view(torch.uint8) if t.dtype == torch.bool else t

    def triton_steer(x, weight, bias, strength, shift, slope, lo, hi, inside, valid, prior, divisor, step, seen, drop,
                     pad, rows, prior_mean, gating, kind, floor, activation):
        """The op on CUDA: the Triton kernels (arguments and results as the op's)."""
        b, k, d = x.shape
        if shift.dim() > 1:  # one shift per row, read at row * D
            shift = shift.expand(b, 1, d)
        out = torch.empty_like(x)
        lam, proj = (x.new_empty((b, k, 1), dtype=torch.float32) for _ in range(2))
        mean = x.new_empty((b, 1, 1), dtype=torch.float32)
        block_k = min(max(triton.next_power_of_2(k), 2), _MAX_BLOCK_K)
        block_d = min(triton.next_power_of_2(d), _TILE // block_k)
        grid = (b, triton.cdiv(k, block_k))
        weight, bias = weight.contiguous(), bias.contiguous()  # (1, D) and (1,): read as (D,) and ()
        if k > block_k:
            _logits_kernel[grid](x, weight, bias, proj, k, d, *x.stride(), BLOCK_K=block_k, BLOCK_D=block_d)
        on_device = isinstance(strength, torch.Tensor) and strength.device == x.device  # else read on the host
        affine, clamp = slope is not None, lo is not None
        _steer_kernel[grid](
            x, weight, bias, strength if on_device else float(strength),
            *(x if t is None else t.contiguous() for t in (shift, slope, lo, hi)),
            _flat(valid, b, k, x), _flat(prior, b, 1, x), _flat(divisor, b, 1, x), _flat(step, b, 1, x),
            _flat(seen, b, k, x), _flat(drop, b, k, x), _flat(pad, b, k, x), _flat(rows, b, 1, x),
            _flat(prior_mean, b, 1, x), out, lam, mean, proj,
            k, d, *x.stride(), *out.stride(), float(floor),
            ONE_PASS=k <= block_k, S_ON_DEVICE=on_device, AFFINE=affine, CLAMP=clamp, INSIDE=bool(inside),
            ROW_SHIFT=shift.dim() > 1,
            HAS_VALID=valid is not None, HAS_PRIOR=prior_mean is not None and prior is not None,
            DECODE=step is not None and prior_mean is not None, CAUSAL=gating == "causal" and kind != "spatial",
            TOKEN=gating == "token", HAS_DROP=drop is not None, HAS_PAD=pad is not None, HAS_ROWS=rows is not None,
            RELU=activation == "relu", BLOCK_K=block_k, BLOCK_D=block_d, BLOCK_R=_ROW,
        )
        return out, lam, mean, proj

    @_steer_layer_op.register_kernel("cuda")
    def _(*args):
        return triton_steer(*args) if args[0].numel() else composite(*args)
