"""The torch port of the `toxic-comment-classifier` BiLSTM: against a reference Keras forward pass written
here on a tiny HDF5 file in the wheel's layout, Keras' tokenization rules, a pickle that names anything
else refused, and (when the wheel is installed) the package's documented scores."""

import importlib.util
import os
import pickle
import sys
import types

import pytest
import torch

h5py = pytest.importorskip("h5py", reason="the classifier port reads HDF5 with h5py (pip install h5py)")

from dsas_diffusion.eval.text_toxicity import (FILTERS, MAXLEN, ToxicCommentClassifier, read_word_index,  # noqa: E402
                                               split_words)

VOCAB, DIM, UNITS, HIDDEN = 12, 4, 3, 5
WORDS = ["the", "you", "are", "dumb", "kind", "a", "cat", "very"]  # indices 1..8


def write_files(folder, num_words=VOCAB, seed=0):
    g = torch.Generator().manual_seed(seed)
    weights = folder / "model.weights.h5"
    with h5py.File(weights, "w") as f:
        def put(path, *shape):
            f[path] = torch.randn(*shape, generator=g).numpy()

        put("layers/embedding/vars/0", num_words, DIM)
        for direction in ("forward", "backward"):
            put(f"layers/bidirectional/{direction}_layer/cell/vars/0", DIM, 4 * UNITS)
            put(f"layers/bidirectional/{direction}_layer/cell/vars/1", UNITS, 4 * UNITS)
            put(f"layers/bidirectional/{direction}_layer/cell/vars/2", 4 * UNITS)
        put("layers/dense/vars/0", 2 * UNITS, HIDDEN)
        put("layers/dense/vars/1", HIDDEN)
        put("layers/dense_1/vars/0", HIDDEN, 6)
        put("layers/dense_1/vars/1", 6)
    return weights


def write_tokenizer(path, monkeypatch, num_words=VOCAB, **fields):
    """A pickle naming keras' Tokenizer class, as the wheel's file does, written without keras."""
    module = types.ModuleType("keras.src.legacy.preprocessing.text")

    class Tokenizer:
        pass

    Tokenizer.__module__, Tokenizer.__qualname__ = module.__name__, "Tokenizer"
    module.Tokenizer = Tokenizer
    parts = module.__name__.split(".")
    for i in range(1, len(parts)):  # pickle imports the module by name, parents first
        monkeypatch.setitem(sys.modules, ".".join(parts[:i]), types.ModuleType(".".join(parts[:i])))
    monkeypatch.setitem(sys.modules, module.__name__, module)
    tok = Tokenizer()
    tok.__dict__.update(filters=FILTERS, split=" ", lower=True, char_level=False, num_words=num_words,
                        oov_token=None, word_index={w: i + 1 for i, w in enumerate(WORDS)})
    tok.__dict__.update(fields)
    tok.word_index.update({"beyond": num_words, "further": num_words + 3})
    path.write_bytes(pickle.dumps(tok, protocol=5))
    return path


def keras_reference(weights, ids):
    """Keras semantics written out: Embedding -> Bidirectional(LSTM, return_sequences) -> GlobalMaxPool1D
    -> Dense(relu) -> Dense(sigmoid); LSTM gates i, f, c, o; backward layer reads the reversed sequence."""
    with h5py.File(weights, "r") as f:
        w = {k: torch.from_numpy(f[k][()]).double() for k in _paths(f)}
    x = w["layers/embedding/vars/0"][ids]

    def lstm(direction, seq):
        k, r, b = (w[f"layers/bidirectional/{direction}_layer/cell/vars/{i}"] for i in range(3))
        h = c = torch.zeros(seq.shape[0], UNITS, dtype=torch.float64)
        outs = []
        for t in range(seq.shape[1]):
            z = seq[:, t] @ k + h @ r + b
            i, fg, cc, o = z.split(UNITS, dim=-1)
            c = torch.sigmoid(fg) * c + torch.sigmoid(i) * torch.tanh(cc)
            h = torch.sigmoid(o) * torch.tanh(c)
            outs.append(h)
        return torch.stack(outs, 1)

    fwd = lstm("forward", x)
    bwd = lstm("backward", x.flip(1)).flip(1)
    pooled = torch.cat([fwd, bwd], -1).amax(1)
    hidden = torch.relu(pooled @ w["layers/dense/vars/0"] + w["layers/dense/vars/1"])
    return torch.sigmoid(hidden @ w["layers/dense_1/vars/0"] + w["layers/dense_1/vars/1"])


def _paths(f):
    out = []
    f.visititems(lambda name, obj: out.append(name) if isinstance(obj, h5py.Dataset) else None)
    return out


@pytest.fixture
def clf(tmp_path, monkeypatch):
    weights = write_files(tmp_path)
    tokenizer = write_tokenizer(tmp_path / "tokenizer.pickle", monkeypatch)
    return ToxicCommentClassifier.from_files(weights, tokenizer), weights


def test_forward_matches_keras_reference(clf):
    model, weights = clf
    texts = ["You are dumb!", "the cat, the cat... very kind", "", "rare words only beyond"]
    ids = model.encode(texts)
    assert ids.shape == (4, MAXLEN)
    torch.testing.assert_close(model.scores(texts).double(), keras_reference(weights, ids), atol=1e-5, rtol=1e-5)


def test_tokenization_follows_keras(clf):
    model, _ = clf
    assert split_words("You're DUMB!!\tthe\ncat.") == ["you're", "dumb", "the", "cat"]
    ids = model.encode(["You are dumb, further beyond rare!"])[0]
    # words ranked >= num_words (beyond, further) and unknown ones (rare) dropped; pre-padded with zeros
    assert ids[-3:].tolist() == [2, 3, 4] and ids[:-3].eq(0).all()
    long = model.encode([" ".join(["the"] * 150 + ["cat"])])[0]  # Keras keeps the last 100 words
    assert long[-1] == 7 and long[:-1].eq(1).all()


def test_word_index_reader_refuses_other_globals(tmp_path, monkeypatch):
    path = tmp_path / "evil.pickle"
    path.write_bytes(pickle.dumps(os.getcwd))  # names a callable of the os module
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        read_word_index(path)
    tok = write_tokenizer(tmp_path / "tok.pickle", monkeypatch, oov_token="<oov>")
    with pytest.raises(ValueError, match="oov_token"):
        read_word_index(tok)


def test_weights_file_of_another_layout_is_refused(tmp_path, monkeypatch):
    tokenizer = write_tokenizer(tmp_path / "tokenizer.pickle", monkeypatch)
    weights = tmp_path / "other.h5"
    with h5py.File(weights, "w") as f:
        f["dense/kernel"] = torch.zeros(2, 2).numpy()
    with pytest.raises(ValueError, match="layers/embedding/vars/0"):
        ToxicCommentClassifier.from_files(weights, tokenizer)


@pytest.mark.skipif(importlib.util.find_spec("toxic_classifier") is None,
                    reason="the toxic-comment-classifier wheel is not installed "
                           "(pip install --no-deps toxic-comment-classifier==0.3.0)")
def test_wheel_reproduces_documented_scores():
    """The package README's example: 'You are so dumb and stupid!' and its six scores."""
    model = ToxicCommentClassifier.from_wheel()
    documented = [0.9889402985572815, 0.07256772369146347, 0.620429277420044, 0.01934845559298992,
                  0.8664075136184692, 0.04072948172688484]
    scores = model.scores(["You are so dumb and stupid!", "Thank you for the lovely dinner."])
    torch.testing.assert_close(scores[0], torch.tensor(documented), atol=1e-4, rtol=0)
    assert scores[1, 0] < 0.1
