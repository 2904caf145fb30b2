"""torch.compile on a steered LM: hooks attached before compiling are traced into the graph and the
KV-cache running state still advances between decoding steps."""

from __future__ import annotations

import pytest
import torch

from dsas_diffusion.llm import attach
from tests.llm.tiny_lms import PROMPTS, fitted, generate, make_model, make_tokenizer


def test_compiled_steered_generate_matches_eager():
    tokenizer, steering = make_tokenizer(), fitted("llama")
    eager_model, compiled_model = make_model("llama"), make_model("llama")
    base = generate(eager_model, tokenizer, PROMPTS)
    with attach(steering, eager_model, strength=2.0) as handle:
        eager = generate(eager_model, tokenizer, PROMPTS)
        eager_scales = handle.scales
    handle = attach(steering, compiled_model, strength=2.0)
    torch._dynamo.reset()
    plain_model = make_model("llama")  # compiled in the same process: must not reuse the steered graph
    for m in (compiled_model, plain_model):
        m.compile(backend="aot_eager")
    compiled = generate(compiled_model, tokenizer, PROMPTS)
    plain = generate(plain_model, tokenizer, PROMPTS)
    assert torch.equal(plain[0], base[0])
    torch.testing.assert_close(plain[1], base[1], rtol=1e-4, atol=1e-4)
    assert torch.equal(compiled[0], eager[0])
    torch.testing.assert_close(compiled[1], eager[1], rtol=1e-4, atol=1e-4)
    assert not torch.equal(eager[0], base[0])  # the steering really changes the tokens
    for name, lam in handle.scales.items():  # the running state advanced inside the compiled graph
        torch.testing.assert_close(lam, eager_scales[name], rtol=1e-5, atol=1e-5)
    handle.detach()


@pytest.mark.parametrize("family", ["llama", "openai-gpt"])
def test_generate_builds_as_many_graphs_as_the_stock_model(family):
    """Three batch sizes and three strengths, 0 among them: as many graphs as the stock compiled model builds, and no
    graph break (the strength is a tensor the graph reads, the recorded lambdas leave it as outputs,
    the running state keeps its strides). The root's pre-forward hook, which follows the KV cache,
    runs eagerly outside the graph: traced, it broke the graph at every decoding step. GPT-1 has no
    KV cache: each step runs the whole sequence, so the prompt length must stay a dynamic size of
    the graph (hashed into a cache key, it made one graph per length: 18 against 4)."""
    from tests.graph_counts import generate_graphs

    stock, steered = generate_graphs(family, False), generate_graphs(family, True)
    assert steered.graphs == stock.graphs and not steered.breaks and not stock.breaks, (stock, steered)


def test_a_steered_model_compiled_after_a_stock_one_runs_its_steering():
    """The other order: the stock copy compiles first. Dynamo guarded neither on the instance nor on
    empty hook dicts, so the steered copy reused the stock graph and generated unsteered tokens."""
    from tests.graph_counts import counting

    tokenizer, steering = make_tokenizer(), fitted("llama")
    plain_model, steered_model = make_model("llama"), make_model("llama")
    base = generate(plain_model, tokenizer, PROMPTS)
    with torch._dynamo.config.patch(skip_nnmodule_hook_guards=True):  # torch's default, until steering attaches
        with counting():
            handle = attach(steering, steered_model, strength=2.0)
        eager = generate(steered_model, tokenizer, PROMPTS)
        assert not torch.equal(eager[0], base[0])
        with counting():
            for m in (plain_model, steered_model):
                m.compile(backend="aot_eager")
            assert torch.equal(generate(plain_model, tokenizer, PROMPTS)[0], base[0])
            compiled = generate(steered_model, tokenizer, PROMPTS)
    assert torch.equal(compiled[0], eager[0])
    handle.detach()


def test_the_steering_constants_enter_the_graph_packed():
    """Every tensor a hook reads from a Python object is an input of the graph, which Dynamo checks at
    each call; a clamped Linear-AcT has six per steered layer (the gate's weight and bias, the map's
    shift, slope and bounds). Packed per width and map form, the inputs steering adds to a compiled
    forward do not grow with the number of layers it steers."""
    from dsas_diffusion.llm import fit_steering
    from tests.graph_counts import counting
    from tests.llm.tiny_lms import CONTROL, SOURCE, TARGET, TINY_FIT

    tokenizer = make_tokenizer()
    added = {}
    for layers in (2, 4):
        steering = fit_steering(make_model("llama", layers=layers), tokenizer, SOURCE, TARGET, CONTROL,
                                method="linear_act", **TINY_FIT)
        inputs = []
        for steered in (False, True):
            model = make_model("llama", layers=layers)
            handle = attach(steering, model, strength=2.0) if steered else None
            with counting() as seen:
                model.compile(backend=seen.backend)
                model(**tokenizer(PROMPTS[:1], return_tensors="pt"))
            inputs.append(seen.inputs[0])
            if handle is not None:
                handle.detach()
        added[layers] = inputs[1] - inputs[0]
    assert added[4] == added[2], added


def test_a_steering_attached_under_a_compiled_steered_model_is_not_skipped():
    """A steered forward traces with torch's default guards on hooks (none on empty hook dicts, which
    cost about 0.4 ms per compiled decoding step); what they caught, a steering attached later under
    the compiled module (here to its inner model, which is not compiled itself), is caught by the hook
    epoch the traced hooks guard on: the graph is rebuilt and the second steering runs."""
    from tests.graph_counts import counting

    tokenizer, steering = make_tokenizer(), fitted("llama")
    first, second = steering.layers[0], steering.layers[-1]
    assert first != second

    def both(model):
        a = attach(steering, model, strength=2.0, layers=[first])
        b = steering.attach(model.model, 2.0, prefix="model.", layers=[second], check_model=False)
        return a, b

    eager_model = make_model("llama")
    handles = both(eager_model)
    eager = generate(eager_model, tokenizer, PROMPTS)
    for h in handles:
        h.detach()
    model = make_model("llama")
    with counting() as seen:
        a = attach(steering, model, strength=2.0, layers=[first])
        model.compile(backend=seen.backend)
        only_first = generate(model, tokenizer, PROMPTS)
        built = seen.graphs
        assert generate(model, tokenizer, PROMPTS)[0].equal(only_first[0]) and seen.graphs == built  # reused
        b = steering.attach(model.model, 2.0, prefix="model.", layers=[second], check_model=False)
        compiled = generate(model, tokenizer, PROMPTS)
        assert seen.graphs > built  # rebuilt with the second steering traced in
    assert not torch.equal(only_first[0], eager[0])  # the second steering changes the tokens
    assert torch.equal(compiled[0], eager[0])
    torch.testing.assert_close(compiled[1], eager[1], rtol=1e-4, atol=1e-4)
    a.detach(), b.detach()


def test_a_steered_graph_keeps_torchs_default_guards_on_hooks():
    """No guard on the hook dicts of unhooked modules (six per module, checked at every call): a hook
    added afterwards to a module the steering does not touch is skipped, as torch.compile skips it on
    any compiled model, and builds no graph. Outside a steered forward the process keeps the guards,
    so a stock model compiled later still builds a graph of its own."""
    from tests.graph_counts import counting

    tokenizer, steering = make_tokenizer(), fitted("llama")
    model = make_model("llama")
    handle = attach(steering, model, strength=2.0)
    assert torch._dynamo.config.skip_nnmodule_hook_guards is False
    with counting() as seen:
        model.compile(backend=seen.backend)
        generate(model, tokenizer, PROMPTS)
        built = seen.graphs
        extra = model.lm_head.register_forward_hook(lambda module, args, output: None)
        generate(model, tokenizer, PROMPTS)
        assert seen.graphs == built and not seen.breaks
        assert torch._dynamo.config.skip_nnmodule_hook_guards is False  # restored after each forward
        stock = make_model("llama")
        stock.compile(backend=seen.backend)
        generate(stock, tokenizer, PROMPTS)
        assert seen.graphs > built
    extra.remove()
    handle.detach()


def test_the_hook_guard_setting_is_restored_when_a_steered_forward_fails():
    model = make_model("llama")
    handle = attach(fitted("llama"), model, strength=2.0)
    with pytest.raises(Exception):
        model(input_ids=torch.full((1, 3), 10_000))  # past the vocabulary: the embedding fails
    assert torch._dynamo.config.skip_nnmodule_hook_guards is False
    handle.detach()
