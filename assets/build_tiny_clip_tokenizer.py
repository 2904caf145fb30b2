"""Build assets/tiny-clip-tokenizer: a CLIP-format BPE tokenizer (vocab.json + merges.txt) over a
small English vocabulary, so tests and toy models need no hub download.

Byte-pair merges are learnt until every listed word is one token; any other word falls back to
pieces and characters. The training is written out here, in plain Python, because the
`tokenizers` trainer breaks ties between equally frequent pairs by ids it hands out in hash order,
so each run wrote another merge order (and other token ids). This one is deterministic and gives
the shipped files byte for byte: it is the trainer's rule (most frequent pair first, ties to the
pair of smaller ids) with the ids the shipped files were first built with.

Run: python assets/build_tiny_clip_tokenizer.py [--out DIR]
"""

import argparse
import json
import string
from collections import Counter
from pathlib import Path

WORDS = """
a an the of on in with and or at by to from for over under near inside beside behind is are
red green blue yellow orange purple pink brown black white grey gray gold silver colorful dark bright
circle square triangle star heart ring cross shape shapes round small large big tiny huge
banana apple orange cherry grape lemon fruit bowl table plate kitchen
dog cat horse bird fish cow sheep rabbit puppy kitten animal
car truck bicycle boat train plane house tree flower forest mountain river sea lake beach city street
man woman person child people face portrait hand
painting photo photograph picture drawing sketch illustration art style artwork canvas oil watercolor
van gogh monet picasso rembrandt impressionist starry night sunflowers
sky cloud sun moon night day morning evening sunset snow rain field garden park road
background foreground scene view landscape still life close up detailed realistic high quality
wooden stone glass metal paper old new modern ancient beautiful cute happy sad
""".split()

SPECIALS = ["<|startoftext|>", "<|endoftext|>"]
ALPHABET = sorted(set(string.ascii_lowercase + string.digits + string.punctuation))
END = "</w>"
# Ids of the word-final letters as the shipped files number them (a later letter goes last, sorted).
WORD_FINAL_ORDER = "k h r e a t l d c g n w y m o p s f".split()
DEFAULT_OUT = Path(__file__).parent / "tiny-clip-tokenizer"


def train(words: list[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """(vocabulary in id order, merges in rank order)."""
    freq = Counter(words)
    pieces = {w: [*w[:-1], w[-1] + END] for w in freq}
    finals = {p[-1][:-len(END)] for p in pieces.values()}
    order = [c for c in WORD_FINAL_ORDER if c in finals] + sorted(finals - set(WORD_FINAL_ORDER))
    vocab = SPECIALS + ALPHABET + [c + END for c in order]
    ids = {token: i for i, token in enumerate(vocab)}
    merges = []
    while True:
        pairs = Counter()
        for word, symbols in pieces.items():
            for pair in zip(symbols, symbols[1:]):
                pairs[pair] += freq[word]
        if not pairs:
            return vocab, merges
        best = min(pairs, key=lambda p: (-pairs[p], ids[p[0]], ids[p[1]]))
        merged = best[0] + best[1]
        merges.append(best)
        ids[merged] = len(vocab)
        vocab.append(merged)
        pieces = {word: _merge(symbols, best, merged) for word, symbols in pieces.items()}


def _merge(symbols: list[str], pair: tuple[str, str], merged: str) -> list[str]:
    out, i = [], 0
    while i < len(symbols):
        if tuple(symbols[i:i + 2]) == pair:
            out.append(merged)
            i += 2
        else:
            out.append(symbols[i])
            i += 1
    return out


def build(out: Path) -> None:
    vocab, merges = train(WORDS)
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, separators=(",", ":"),
                                               ensure_ascii=False), encoding="utf-8")
    (out / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "bos_token": SPECIALS[0],
        "eos_token": SPECIALS[1], "pad_token": SPECIALS[1], "unk_token": SPECIALS[1],
    }, indent=2) + "\n")
    print(f"wrote {out}: {len(vocab)} tokens")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"folder to write (default: {DEFAULT_OUT})")
    build(parser.parse_args(argv).out)


if __name__ == "__main__":
    main()
