"""Checks of everything a user hands to a fit, run before any model does.

Shared by the pipeline fit and the language-model fit, so both refuse the same bad input with the
same words: example sets (types, duplicates, sizes, overlap) and fit arguments (by name, value and fix).
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import MISSING, fields
from numbers import Integral, Real

from .config import GATE_ACTIVATIONS, GATINGS, SPATIAL_MAPS, SteeringConfig
from .maps import MAPS, OUTSIDE_SOURCE_RANGE
from .options import _describe, check_bool

LABELS = ("source", "target", "control")
# The SteeringConfig fields a user may pass to a fit; the others (method, base_model, fingerprint,
# layers, ...) the fit fills in itself, and a field added to the config later is not an option by accident.
FIT_OPTIONS = ("pca_rank", "logistic_l2", "accuracy_threshold", "accuracy_scaling", "held_out_fraction", "cv_folds",
               "gating", "skip_first_token", "lambda_floor", "clamp_to_source_range", "gate_activation", "seed",
               "outside_source_range", "spatial_map")
MAX_SEED = 2**63 - 1  # torch generators take 64-bit seeds; a fit adds the prompt index to the seed


# --- single arguments -------------------------------------------------------------------------

_shown = _describe


def positive_int(name: str, value, fix: str = "") -> int:
    """An int >= 1 (bool refused: True is not a size)."""
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise TypeError(f"{name} must be a positive integer, got {_shown(value)}{fix}")
    if value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}{fix}")
    return int(value)


def seed_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise TypeError(f"{name} must be an integer (the seed of the held-out split), got {_shown(value)}; "
                        f"pass e.g. {name}=0")
    if not 0 <= value <= MAX_SEED:
        raise ValueError(f"{name} must lie in [0, 2**63 - 1], got {value!r}; pass e.g. {name}=0")
    return int(value)


def real_number(name: str, value, low: float = -math.inf, high: float = math.inf, *, low_open: bool = False,
                high_open: bool = False, fix: str = "") -> float:
    """A finite real number in the given interval (bool, strings, tensors, NaN and inf refused)."""
    lo, hi = "(" if low_open else "[", ")" if high_open else "]"
    if high == math.inf:
        bounds = "" if low == -math.inf else f" {'>' if low_open else '>='} {low:g}"
    else:
        bounds = f" in {lo}{low:g}, {high:g}{hi}"
    wanted = f"{name} must be a finite number{bounds}"
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{wanted}, got {_shown(value)}{fix}")
    value = float(value)
    inside = (low < value if low_open else low <= value) and (value < high if high_open else value <= high)
    if not math.isfinite(value) or not inside:
        raise ValueError(f"{wanted}, got {value!r}{fix}")
    return value


def flag(name: str, value) -> bool:
    return check_bool(value, name)


def choice(name: str, value, choices: Iterable[str]) -> str:
    choices = sorted(choices)
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name}={value!r} is unknown; choose one of {choices}")
    return value


def method_name(method) -> str:
    """A registered map family (`method=` of every fit)."""
    if not isinstance(method, str) or method not in MAPS:
        raise ValueError(f"method={method!r} is unknown; choose one of {sorted(MAPS)}")
    return method


def layer_pattern(name: str, value, *, allow_none: bool = False, fix: str = "") -> str | None:
    """A regular expression (or preset name) over module names that compiles; `fix` suggests one."""
    fix = fix or f"{name}=r'model\\.layers\\.\\d+'"
    if value is None and allow_none:
        return None
    if not isinstance(value, str):
        what = "None, a preset name or a regular expression string" if allow_none else "a regular expression string"
        raise TypeError(f"{name} must be {what}, got {_shown(value)}; pass e.g. {fix}")
    try:
        re.compile(value)
    except re.error as e:
        raise ValueError(f"{name}={value!r} is not a valid regular expression ({e}); pass a regular expression "
                         f"over module names, e.g. {fix}") from None
    return value


def _default(option: str):
    field = next(f for f in fields(SteeringConfig) if f.name == option)
    return field.default if field.default is not MISSING else None


def check_fit_options(options: Mapping, caller: str, arguments: Sequence[str] = ()) -> dict:
    """The `SteeringConfig` options a user passed to a fit, refused by name when unknown or out of
    range, and returned as plain Python values (so the saved config holds what it declares)."""
    allowed = set(FIT_OPTIONS)
    unknown = sorted(set(options) - allowed)
    if unknown:
        own = f"; its own arguments are {sorted(arguments)}" if arguments else ""
        raise TypeError(f"{caller} got unknown option(s) {unknown}; steering options are {sorted(allowed)}{own}")

    def fix(option):
        return f"; pass e.g. {option}={_default(option)!r} (the default)"

    checked = dict(options)
    for option, value in options.items():
        if option == "pca_rank":
            checked[option] = positive_int(option, value, fix(option))
        elif option == "logistic_l2":
            checked[option] = real_number(option, value, 0.0, low_open=True, fix=fix(option))
        elif option == "accuracy_threshold":
            checked[option] = real_number(option, value, 0.0, 1.0, fix=fix(option))
        elif option in ("held_out_fraction", "lambda_floor"):
            checked[option] = real_number(option, value, 0.0, 1.0, high_open=True, fix=fix(option))
        elif option == "cv_folds":
            folds = "; pass 0 (one held-out split) or a number of folds >= 2, e.g. cv_folds=4"
            if isinstance(value, bool) or not isinstance(value, Integral):
                raise TypeError(f"cv_folds must be an integer, got {_shown(value)}{folds}")
            if value < 0 or value == 1:
                raise ValueError(f"cv_folds must be 0 or >= 2, got {value!r}{folds}")
            checked[option] = int(value)
        elif option == "gating":
            checked[option] = choice(option, value, GATINGS)
        elif option == "gate_activation":
            checked[option] = choice(option, value, GATE_ACTIVATIONS)
        elif option == "outside_source_range":
            checked[option] = choice(option, value, OUTSIDE_SOURCE_RANGE)
        elif option == "spatial_map":
            checked[option] = choice(option, value, SPATIAL_MAPS)
        elif option in ("skip_first_token", "clamp_to_source_range", "accuracy_scaling"):
            checked[option] = flag(option, value)
        elif option == "seed":
            checked[option] = seed_int(option, value)
    return checked


# --- example sets -----------------------------------------------------------------------------

def example_list(label: str, items) -> list[str]:
    """The examples of one set as a list of non-empty texts, in the order given."""
    if isinstance(items, (str, bytes)):
        raise TypeError(f"{label} must be a list of examples, not one string: pass [{items!r}, ...]")
    if isinstance(items, (Mapping, AbstractSet)) or not isinstance(items, Iterable):
        why = "; a set or dict has no fixed order, and the held-out split depends on it" \
            if isinstance(items, (Mapping, AbstractSet)) else ""
        raise TypeError(f"{label} must be a list of texts, got {type(items).__name__}{why}; pass a list of strings")
    items = list(items)
    for i, x in enumerate(items):
        if not isinstance(x, str):
            raise TypeError(f"the {label} set holds an empty or non-text example at index {i}: {_shown(x)}; every "
                            "example must be non-empty text")
        if not x.strip():
            raise ValueError(f"the {label} set holds an empty or non-text example at index {i} ({x!r}); every "
                             "example must be non-empty text")
    return [str(x) for x in items]


def drop_duplicates(label: str, texts: list[str], keys: list[Hashable], stacklevel: int = 2) -> tuple[list, list]:
    """(texts, keys) with every repeat of an earlier key removed, with a warning naming the set.

    A repeated example would sit on both sides of the held-out split and score the gate on
    examples it was trained on (`[p] * 12` scores 1.0 from memorisation)."""
    first: dict[Hashable, int] = {}
    for i, key in enumerate(keys):
        first.setdefault(key, i)
    if len(first) == len(keys):
        return texts, keys
    kept = sorted(first.values())
    dup = next(i for i in range(len(keys)) if first[keys[i]] != i)
    same = "" if texts[dup] == texts[first[keys[dup]]] else f" (the model sees it as {texts[first[keys[dup]]]!r})"
    warnings.warn(
        f"the {label} set holds {len(keys) - len(kept)} duplicate example(s) ({len(kept)} distinct of {len(keys)}), "
        f"e.g. {texts[dup]!r}{same}; dropped them, so that the held-out gate accuracy is measured on examples the "
        "gate was not trained on. Pass distinct examples to silence this",
        UserWarning, stacklevel=stacklevel + 1)
    return [texts[i] for i in kept], [keys[i] for i in kept]


def check_example_sets(
    source: Sequence, target: Sequence, control: Sequence, min_size: int = 2, pca_rank: int | None = None,
    key: Callable[[list[str]], list[Hashable]] | None = None, stacklevel: int = 2,
) -> tuple[list[str], list[str], list[str]]:
    """(source, target, control) as lists of distinct texts; refuses empty, tiny or one-class sets,
    sets that share examples between source and control, or too few for the gate's PCA.

    `key` maps texts to what the model sees (token ids, say), so texts it cannot tell apart count as
    duplicates; by default texts are compared as they are."""
    texts = {label: example_list(label, items) for label, items in zip(LABELS, (source, target, control))}
    keys = {}
    for label in LABELS:
        if not texts[label]:
            raise ValueError(f"the {label} set is empty; pass at least {min_size} examples")
        given = len(texts[label])
        keyed = list(texts[label]) if key is None else [_hashable(k) for k in key(texts[label])]
        texts[label], keys[label] = drop_duplicates(label, texts[label], keyed, stacklevel + 1)
        n = len(texts[label])
        if n < min_size:
            dropped = f" distinct example(s) ({given - n} duplicate(s) dropped)" if n < given else " example(s)"
            raise ValueError(f"the {label} set has {n}{dropped}; pass at least {min_size}")
    _check_source_vs_control(texts, keys, stacklevel + 1)
    if isinstance(pca_rank, int) and len(texts["source"]) + len(texts["control"]) < pca_rank:
        raise ValueError(f"pca_rank={pca_rank} needs at least {pca_rank} source + control examples, got "
                         f"{len(texts['source']) + len(texts['control'])} distinct ones; pass more examples or a "
                         "lower pca_rank")
    return texts["source"], texts["target"], texts["control"]


def _check_source_vs_control(texts: dict, keys: dict, stacklevel: int) -> None:
    """Refuse examples in both source and control (see `_check_two_classes`); warn about source
    examples the target set leaves unchanged."""
    _check_two_classes(texts["source"], keys["source"], keys["control"], ("source", "control"))
    target = set(keys["target"])
    unchanged = [t for t, k in zip(texts["source"], keys["source"]) if k in target]
    if unchanged:
        warnings.warn(
            f"{len(unchanged)} source example(s) are also in the target set, e.g. {unchanged[0]!r}; the map learns "
            "no change from them. Check that the target set replaces the concept in every example",
            UserWarning, stacklevel=stacklevel + 1)


def _check_two_classes(positive: list[str], positive_keys: list, negative_keys: list, labels: tuple[str, str]) -> None:
    """Refuse examples in both sets of a gate: each is labelled 'concept' and 'no concept' at once,
    which no gate can learn, and the held-out score counts it as an error on whichever side it
    lands [choice: refuse, not warn; it is always a mistake in the sets and easy to fix]."""
    pos, neg = labels
    negative = set(negative_keys)
    if set(positive_keys) == negative:
        raise ValueError(
            f"{pos} and {neg} hold the same examples, so the gate has only one class to learn from; {neg} "
            f"must be examples WITHOUT the concept ({pos}: with it)"
        )
    shared = [t for t, k in zip(positive, positive_keys) if k in negative]
    if shared:
        raise ValueError(
            f"{len(shared)} example(s) are in both the {pos} and the {neg} set, e.g. {shared[0]!r}; the gate "
            f"would learn each as both 'concept' and 'no concept'. Remove them from the set they do not belong to "
            f"({pos}: with the concept, {neg}: without it)"
        )


def check_gate_sets(gate_source: Sequence, gate_control: Sequence, min_size: int = 2, pca_rank: int | None = None,
                    key: Callable[[list[str]], list[Hashable]] | None = None,
                    stacklevel: int = 2) -> tuple[list[str], list[str]]:
    """(gate_source, gate_control) of a conditional steering, checked as source and control are:
    distinct texts (duplicates dropped with a warning), no text in both, enough for the PCA."""
    labels = ("gate_source", "gate_control")
    texts, keys = {}, {}
    for label, items in zip(labels, (gate_source, gate_control)):
        texts[label] = example_list(label, items)
        keyed = list(texts[label]) if key is None else [_hashable(k) for k in key(texts[label])]
        given = len(texts[label])
        texts[label], keys[label] = drop_duplicates(label, texts[label], keyed, stacklevel + 1)
        if len(texts[label]) < min_size:
            dropped = f" ({given - len(texts[label])} duplicate(s) dropped)" if len(texts[label]) < given else ""
            raise ValueError(f"the {label} set has {len(texts[label])} distinct example(s){dropped}; pass at least "
                             f"{min_size}")
    _check_two_classes(texts["gate_source"], keys["gate_source"], keys["gate_control"], labels)
    if isinstance(pca_rank, int) and len(texts["gate_source"]) + len(texts["gate_control"]) < pca_rank:
        raise ValueError(f"pca_rank={pca_rank} needs at least {pca_rank} gate_source + gate_control examples, got "
                         f"{len(texts['gate_source']) + len(texts['gate_control'])} distinct ones; pass more "
                         "examples or a lower pca_rank")
    return texts["gate_source"], texts["gate_control"]


def _hashable(key) -> Hashable:
    """Token id lists become tuples, so they can be compared as keys."""
    return tuple(key) if isinstance(key, list) else key
