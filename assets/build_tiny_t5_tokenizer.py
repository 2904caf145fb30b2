"""Build assets/tiny-t5-tokenizer: a T5-format unigram tokenizer (tokenizer.json) over a small English
vocabulary, so tests can build tiny SD3, FLUX and PixArt-Σ pipelines with no hub download.

Every listed word is one piece ("▁word"), so ordinary prompts split into distinct word tokens; any
other word falls back to single characters, and anything else to <unk>. Ids follow T5's layout
(<pad> = 0, </s> = 1, <unk> = 2), so a tiny `T5Config(pad_token_id=0, eos_token_id=1)` matches it.
No training is involved: the vocabulary is the word list in order, so reruns write the same files.

Run: python assets/build_tiny_t5_tokenizer.py [--out DIR]
"""

import argparse
import string
from pathlib import Path

WORDS = """
a an the of on in with and or at by to from for over under near inside beside behind is are
red green blue yellow orange purple pink brown black white grey gray gold silver colorful dark bright
crimson scarlet round disc
circle square triangle star heart ring cross shape shapes small large big tiny huge
banana apple cherry grape lemon fruit bowl table plate kitchen
dog cat horse bird fish cow sheep rabbit puppy kitten animal
car truck bicycle boat train plane house tree flower forest mountain river sea lake beach city street
man woman person child people face portrait hand
painting photo photograph picture drawing sketch illustration art style artwork canvas oil watercolor
van gogh monet picasso rembrandt impressionist starry night sunflowers
sky cloud sun moon day morning evening sunset snow rain field garden park road
background foreground scene view landscape still life close up detailed realistic high quality
wooden stone glass metal paper old new modern ancient beautiful cute happy sad blurry
""".split()

SPECIALS = ["<pad>", "</s>", "<unk>"]
SPACE = "\u2581"  # SentencePiece's word-start mark
CHARACTERS = list(string.ascii_lowercase + string.ascii_uppercase + string.digits + string.punctuation)
DEFAULT_OUT = Path(__file__).parent / "tiny-t5-tokenizer"


def vocabulary() -> list[tuple[str, float]]:
    """(piece, log-probability) in id order: a whole word (-1) always beats its characters (-10 each)."""
    words = list(dict.fromkeys(WORDS))
    return ([(token, 0.0) for token in SPECIALS] + [(SPACE, -5.0)] + [(SPACE + w, -1.0) for w in words]
            + [(c, -10.0) for c in CHARACTERS])


def build(out: Path) -> None:
    from transformers import T5TokenizerFast

    tokenizer = T5TokenizerFast(vocab=vocabulary(), extra_ids=0, model_max_length=512)
    tokenizer.save_pretrained(out)
    print(f"wrote {out}: {len(tokenizer)} tokens")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"folder to write (default: {DEFAULT_OUT})")
    build(parser.parse_args(argv).out)


if __name__ == "__main__":
    main()
