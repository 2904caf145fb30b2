"""Fitting a Steering on a transformers causal language model.

1. Check the inputs before the model runs (example sets, tokenizer, lengths, options).
2. Run source, target and control texts through the model in right-padded batches and record,
   at every chosen layer, each text's mean activation over its real tokens (padding excluded).
   Right padding keeps every token at its own position, so a text's activations do not depend
   on the batch it was run in.
3. Fit one map (source -> target) and one gate (source vs control, or gate_source vs
   gate_control) per layer; learned maps (LinEAS) and end-to-end gates are then trained
   through the model (core/learned.py) on batches of the same texts.

Layer names are the model's own module names (prefix ""), as `Steering.attach(model)` expects.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from contextlib import contextmanager

import torch
from torch import nn
from tqdm.auto import tqdm

from ..core import ActivationCapture, Steering, SteeringConfig, check_example_sets, fit_from_activations
from ..core.fingerprint import fingerprint
from ..core.fit_inputs import (check_fit_options, check_gate_sets, choice, flag, layer_pattern, method_name,
                               positive_int)
from ..core.learned import training_options, train_steering
from ..core.maps import map_class
from ..core.registry import gate_kinds
from ..core.modules import check_weights_loaded
from .sequence import causal_lm_pre_forward
from .targets import resolve_layers


GATE_STEP = 4  # read_positions: one gate row every GATE_STEP positions [measured on SmolLM2: 2 did no better]
# SteeringConfig fields whose language-model default differs from the config's (see fit_steering)
LM_DEFAULTS = {"gating": "causal", "pca_rank": 16, "lambda_floor": 0.9}
LM_CONTINUATIONS = 32  # fit_steering(continuations=) default [measured: see fit_steering]


def context_length(model: nn.Module) -> tuple[int | None, str]:
    """(the longest sequence the model's positions cover, the config field saying so), if it says."""
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    for key in ("max_position_embeddings", "n_positions"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value, f"config.{key}"
    return None, ""


def check_model_and_tokenizer(model, tokenizer) -> None:
    if not isinstance(model, nn.Module) or not hasattr(model, "config"):
        raise TypeError(f"model must be a transformers model (an nn.Module with a .config), got {type(model).__name__}")
    if not callable(tokenizer) or not hasattr(tokenizer, "pad_token_id"):
        raise TypeError(f"tokenizer must be a transformers tokenizer, got {type(tokenizer).__name__}; "
                        "pass the model's tokenizer as the second argument")
    if tokenizer.pad_token_id is None:
        raise ValueError(
            "the tokenizer has no pad token, so texts of different lengths cannot be batched; set one first: "
            "`tokenizer.pad_token = tokenizer.eos_token` (padding is excluded from every mean, so its id does not "
            "matter)"
        )


def check_text_lengths(texts: Sequence[str], token_ids: list[list[int]], model: nn.Module, label: str,
                       skip_first: bool = False) -> None:
    """Positions past the context have no embedding: such a text fails deep inside the model or, worse,
    gives activations the model never produces in use. A text of no tokens has no mean at all, nor
    has a text of one token when the first token is never steered (`skip_first`)."""
    limit, field = context_length(model)
    for text, ids in zip(texts, token_ids):
        if len(ids) == 0:
            raise ValueError(f"a {label} text tokenizes to no tokens, so it has no activations to average: {text!r}; "
                             "remove it or give it words the tokenizer knows")
        if skip_first and len(ids) == 1:
            raise ValueError(f"a {label} text is a single token, {text!r}, and the first token is never steered "
                             "(skip_first_token=True), so nothing of it is left to fit on; give it more words, or "
                             "pass skip_first_token=False")
        if limit is not None and len(ids) > limit:
            raise ValueError(
                f"a {label} text has {len(ids)} tokens but the model's context holds {limit} ({field}); "
                f"shorten it: {text[:80]!r}..."
            )


@contextmanager
def _eval_mode(model: nn.Module):
    """Dropout off while collecting; every module's own mode restored afterwards."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def _device(model: nn.Module) -> torch.device:
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    return next(model.parameters()).device


def pad_right(token_ids: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) with padding after each text, whatever the tokenizer's padding_side."""
    width = max(len(ids) for ids in token_ids)
    input_ids = torch.full((len(token_ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(token_ids), width), dtype=torch.long)
    for row, ids in enumerate(token_ids):
        input_ids[row, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        mask[row, :len(ids)] = 1
    return input_ids, mask


def _runner(model: nn.Module, encoded: dict[str, list[list[int]]], pad_id: int):
    """`run(label, rows)` for core/learned.py: one right-padded forward of those texts, with gradients."""
    device = _device(model)
    extra = {"use_cache": False}
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        extra["logits_to_keep"] = 1

    def run(label: str, rows) -> None:
        input_ids, mask = pad_right([encoded[label][i] for i in rows], pad_id)
        model(input_ids=input_ids.to(device), attention_mask=mask.to(device), **extra)

    return run


@torch.no_grad()
def continued(model: nn.Module, token_ids: list[list[int]], pad_id: int, eos_id: int | None, tokens: int,
              batch_size: int, desc: str = "continuing", progress: bool = True) -> list[list[int]]:
    """Each text's ids followed by the model's own greedy continuation of up to `tokens` tokens (the
    unsteered model, left-padded batches; it stops at the end-of-sequence token, which is not kept).

    Why [measured, issue 12]: a causal gate reads the mean over everything so far, and along a
    generation that mean drifts away from the prompt's (a control's lambda at SmolLM2's layer 15
    rose from 0.02 on the prompt to 0.31 after 24 tokens); fitted on prompts alone, the gate never saw it."""
    device = _device(model)
    out = []
    batches = [token_ids[i:i + batch_size] for i in range(0, len(token_ids), batch_size)]
    with _eval_mode(model):
        for batch in tqdm(batches, desc=desc, leave=False, disable=not progress):
            width = max(len(ids) for ids in batch)
            input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, ids in enumerate(batch):
                input_ids[row, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
                mask[row, width - len(ids):] = 1
            new = model.generate(input_ids=input_ids.to(device), attention_mask=mask.to(device), do_sample=False,
                                 max_new_tokens=tokens, min_new_tokens=0, pad_token_id=pad_id, eos_token_id=eos_id,
                                 num_beams=1)[:, width:].tolist()
            for ids, more in zip(batch, new):
                if eos_id is not None and eos_id in more:
                    more = more[:more.index(eos_id)]
                out.append(list(ids) + more)
    return out


@torch.no_grad()
def collect_activations(model, token_ids: list[list[int]], pad_id: int, names: list[str], batch_size: int,
                        desc: str = "collecting", progress: bool = True, skip_first: bool = True,
                        at: list[list[int]] | None = None) -> dict[str, torch.Tensor]:
    """{layer name: (texts, D)} mean activation over the positions of each text that run time steers:
    its real tokens, less the first one with `skip_first` (the config's `skip_first_token`), float32
    on the CPU. With `at` (positions per text): one row per position instead, the running mean up to
    it (what a causal gate reads there), text by text."""
    device = _device(model)
    extra = {"use_cache": False}
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        extra["logits_to_keep"] = 1  # the vocabulary projection of every token is not needed
    batches = [token_ids[i:i + batch_size] for i in range(0, len(token_ids), batch_size)]
    with ActivationCapture(model, names, pre_forward=causal_lm_pre_forward(model), skip_first=skip_first) as cap, \
            _eval_mode(model):
        for i, batch in enumerate(tqdm(batches, desc=desc, leave=False, disable=not progress)):
            input_ids, mask = pad_right(batch, pad_id)
            if at is not None:
                cap.at = torch.zeros_like(mask, dtype=torch.bool)
                for row, positions in enumerate(at[i * batch_size:(i + 1) * batch_size]):
                    cap.at[row, positions] = True
            model(input_ids=input_ids.to(device), attention_mask=mask.to(device), **extra)
        return cap.collect()


def fit_steering(
    model: nn.Module,
    tokenizer,
    source: Sequence[str],
    target: Sequence[str],
    control: Sequence[str],
    method: str = "mean_shift",
    *,
    gates: str = "two_stage",
    gate_source: Sequence[str] | None = None,
    gate_control: Sequence[str] | None = None,
    training: dict | None = None,
    incremental: bool = False,
    layers: str | None = None,
    continuations: int = LM_CONTINUATIONS,
    batch_size: int = 8,
    progress: bool = True,
    **config_options,
) -> Steering:
    """Fit a DSAS steering on `model`: maps from `source` to `target` texts, gates from `source`
    vs `control` texts, at the layers named by `layers` (a preset of `layer_presets(model)`, a regular
    expression over module names, or None for the architecture's default).

    `config_options` are `SteeringConfig` fields (pca_rank, gating, accuracy_threshold, ...).
    On language models the defaults are `LM_DEFAULTS` [choice, measured]: `gating="causal"` (per-token
    gating lets ordinary words of control texts score high: in the toy language world at alpha 4 it
    left 46 % of control continuations unchanged, causal gating 100 %) and `pca_rank=16` (on
    SmolLM2-135M the top 5 principal components of sentence means hold the sentence frames, not the
    topic: 1 of 30 layers' gates passed at rank 5; in the toy world rank 16 removed the concept from
    every held-out source prompt at alpha 4, rank 5 left 19 %). Under causal gating the gates are
    fitted on what run time reads (`read_positions`). Two more defaults make DSAS spare controls on a
    real model: `lambda_floor=0.9` (lambdas below it snap to 0 at run time, so a control the gate is
    unsure of is left exactly as it was) and `continuations=32` (below). Measured on SmolLM2-135M's
    held-out prompts, with neither no control continuation was left unchanged at concept rate <= 10 %
    (toxicity and topic tasks, benchmarks/results/real_lm_before_defaults.md), nor with the floor alone (topic,
    real_lm_defaults.md); with both, 88 % at concept rate 6 % (topic, alpha 1) and 84 % at 9 %
    (toxicity, alpha 2), where plain mean shift at full removal changed every one
    (real_lm_recommended.md). In the toy language world, where DSAS spares every control without the
    floor, the floor costs removal and answer quality at a given alpha, never a control: mean shift at
    alpha 3 removed every insult with 96 % polite answers at floor 0; at floor 0.9 the best was 8 %
    insults with 52 % polite (alpha 3.5; benchmarks/results/toy_lm_defaults.md).
    End-to-end gates (`gates="e2e"`) keep floor 0: they are learned without one. The old behaviour:
    `continuations=0, lambda_floor=0.0`.
    Texts that tokenize alike are dropped as duplicates (with a warning) before the held-out split,
    and a text in both source and control is refused. Every argument is checked before the model runs.
    Attach the result with `dsas_diffusion.llm.attach(steering, model)`.

    - `method="lineas"`: per-unit affine maps at every layer, learned jointly through the model
      (core/learned.py); with the default two-stage gates this is LinEAS + DSAS, and attached with
      `gated=False` plain LinEAS.
    - `gates="e2e"`: the gates are learned through the model with the maps (or alone, for a
      closed-form map), starting from the two-stage ones; `gate_activation="relu"` learns ReLU gates.
    - `gate_source` / `gate_control`: fit the gates on these texts instead (a conditional steering:
      the map of source -> target applied where the gate of another concept fires).
    - `training`: options of the learning (`core.learned.TrainingOptions`: steps, lr, batch_size,
      control_weight, sparsity, patience, min_improvement), e.g. `training={"steps": 200}`.
    - `continuations=N` (default 32; 0: the texts alone): fit on each text followed by the unsteered model's own
      greedy continuation of up to N tokens (`continued`), so the maps and gates see the activations
      of a generation, where a causal gate's running mean drifts from the prompt's. It costs one
      generation of every fitting text.
    - `incremental=True`: as AcT fits, each layer's map (closed-form families) is fitted on source
      activations already steered, plainly, by the maps of the layers before it: one more pass of
      the source texts per layer. The gates are fitted on unsteered activations either way.
    """
    # 1. inputs, before the model runs
    check_model_and_tokenizer(model, tokenizer)
    method = method_name(method)
    config_options = check_fit_options(config_options, "fit_steering", ("gates", "gate_source", "gate_control",
                                                                         "training", "incremental", "layers",
                                                                         "continuations", "batch_size", "progress"))
    gates = choice("gates", gates, gate_kinds())
    # the floor is a two-stage default: end-to-end gates are learned without it
    config_options = {**LM_DEFAULTS, **({"lambda_floor": 0.0} if gates == "e2e" else {}), **config_options}
    learned = map_class(method).learned or gates == "e2e"
    if training is not None and not learned:
        raise ValueError(f"training options apply to what is learned through the model (method='lineas' or "
                         f"gates='e2e'); method={method!r} with gates={gates!r} learns nothing: drop training=")
    options = training_options(training)
    incremental = flag("incremental", incremental)
    if incremental and map_class(method).learned:
        raise ValueError(f"incremental=True refits closed-form maps layer by layer; method={method!r} is learned "
                         "through the model, every layer on activations steered by the layers before it already: "
                         "drop incremental=True")
    conditional = gate_source is not None or gate_control is not None
    if conditional and gates == "e2e":
        raise ValueError("gate_source / gate_control give two-stage gates of another concept; end-to-end gates "
                         "learn from source, target and control alone. Pass gates='two_stage' for a conditional "
                         "steering, or drop gate_source / gate_control")
    batch_size = positive_int("batch_size", batch_size)
    if continuations != 0:
        continuations = positive_int("continuations", continuations, "; pass continuations=0 to fit on the texts "
                                                                      "alone, or e.g. continuations=32")
    progress = flag("progress", progress)
    layer_pattern("layers", layers, allow_none=True, fix="layers='residual' (a preset: the output of every decoder "
                                                         "block) or layers=r'model\\.layers\\.\\d+'")
    check_weights_loaded(model)
    # texts the model sees as the same tokens are duplicates (dropped, with a warning)
    source, target, control = check_example_sets(
        source, target, control, pca_rank=config_options.get("pca_rank", 5),
        key=lambda texts: tokenizer(texts)["input_ids"], stacklevel=2)
    if conditional:
        gate_source, gate_control = check_gate_sets(
            source if gate_source is None else gate_source, control if gate_control is None else gate_control,
            pca_rank=config_options.get("pca_rank", 5), key=lambda texts: tokenizer(texts)["input_ids"], stacklevel=2)
    pattern, names = resolve_layers(model, layers)
    sets = {"source": source, "target": target, "control": control}
    if conditional:
        sets.update(gate_source=gate_source, gate_control=gate_control)
    encoded = {label: tokenizer(list(texts))["input_ids"] for label, texts in sets.items()}
    for label, texts in sets.items():
        check_text_lengths(texts, encoded[label], model, label, config_options.get("skip_first_token", True))
    text_lengths = {label: [len(ids) for ids in encoded[label]] for label in sets}
    if continuations:
        eos = getattr(tokenizer, "eos_token_id", None)
        encoded = {label: continued(model, ids, tokenizer.pad_token_id, eos, continuations, batch_size,
                                    f"continuing {label} texts", progress) for label, ids in encoded.items()}
        for label, texts in sets.items():
            check_text_lengths(texts, encoded[label], model, f"{label} (with its continuation)")
    info, probe = fingerprint(model)
    config = SteeringConfig(
        method=method,
        base_model=getattr(model.config, "_name_or_path", None) or getattr(model, "name_or_path", None) or None,
        fingerprint={"": info},
        targets={"": pattern},
        gates=gates,
        incremental=incremental,
        num_examples={label: len(texts) for label, texts in sets.items()},
        **config_options,
    )

    # 2. pooled activations of every set; under causal gating, source and control as a causal gate reads them
    #    (gates of other sets, `gate_source` / `gate_control`, keep whole-text means)
    at = {}
    if config.gating == "causal" and gates == "two_stage" and not conditional:
        at = {"source": read_positions([len(ids) for ids in encoded["source"]],
                                       [n - 1 for n in text_lengths["source"]]),
              "control": read_positions([len(ids) for ids in encoded["control"]],
                                        [int(config.skip_first_token)] * len(encoded["control"]))}
    acts = {label: collect_activations(model, encoded[label], tokenizer.pad_token_id, names, batch_size,
                                       f"{label} texts", progress, config.skip_first_token, at.get(label))
            for label in sets}
    groups = {}
    for label, positions in at.items():  # the maps read each text's mean: the running mean at its last position
        counts = torch.tensor([len(p) for p in positions])
        groups[label] = torch.repeat_interleave(torch.arange(len(positions)), counts)
        acts[f"gate_{label}"] = rows = acts[label]
        acts[label] = {n: a[counts.cumsum(0) - 1] for n, a in rows.items()}

    # 3. maps and gates, then what is learned through the model or refitted incrementally
    def refine(steering: Steering) -> Steering:
        if incremental:
            steering = refit_incrementally(steering, model, encoded["source"], tokenizer.pad_token_id,
                                           acts["target"], batch_size, progress)
        if learned:
            target = {n: a.to(_device(model)) for n, a in acts["target"].items()}
            # train_steering freezes the weights, turns dropout off and enables autograd itself
            steering, _ = train_steering(steering, model, _runner(model, encoded, tokenizer.pad_token_id),
                                         {"source": len(source), "control": len(control)}, target, options,
                                         pre_forward=causal_lm_pre_forward(model), progress=progress)
        return steering

    return fit_from_activations(acts["source"], acts["target"], acts["control"], config, probes={"": probe},
                                progress=progress, gate_source=acts.get("gate_source"),
                                gate_control=acts.get("gate_control"), source_groups=groups.get("source"),
                                control_groups=groups.get("control"),
                                refine=refine if learned or incremental else None)


def read_positions(lengths: list[int], starts: list[int], step: int = GATE_STEP) -> list[list[int]]:
    """Per text, the positions whose running means a causal gate is fitted on: every `step`-th one from
    its end back to `starts` (the end always included).

    Why [measured on SmolLM2-135M, issue 12]: run time reads a causal gate at every position, and a
    gate fitted on whole-text means alone fired on the shared opening of every chat (system prompt,
    "Tell me about") and on controls' early prefixes, where it had seen nothing; so control texts
    give rows from their first steered position on, source texts from the end of the text as given
    (where the concept is in it) along any continuation."""
    return [sorted(range(n - 1, min(start, n - 1) - 1, -step)) for n, start in zip(lengths, starts)]


def refit_incrementally(steering: Steering, model: nn.Module, source_ids: list[list[int]], pad_id: int,
                        target: dict[str, torch.Tensor], batch_size: int, progress: bool = True) -> Steering:
    """The maps refitted in layer order, each on the source activations the model produces with
    the (refitted) maps of the layers before it attached plainly (lambda = 1, strength 1)."""
    config = steering.config
    mcls = map_class(config.method)
    maps = dict(steering.maps)
    for i, name in enumerate(tqdm(steering.layers[1:], desc="refitting layers", leave=False, disable=not progress)):
        upstream = Steering(config, maps, steering.gates, steering.probes)
        with upstream.attach(model, layers=steering.layers[:i + 1], gated=False, check_model=False):
            source = collect_activations(model, source_ids, pad_id, [name], batch_size, progress=False,
                                         skip_first=config.skip_first_token)[name]
        maps[name] = mcls.fit(source, target[name], clamp_to_source_range=config.clamp_to_source_range,
                              logistic_l2=config.logistic_l2)
    return Steering(config, maps, steering.gates, steering.probes)
