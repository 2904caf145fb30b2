"""Build assets/tiny-clip-tokenizer: a CLIP-format BPE tokenizer (vocab.json + merges.txt) over a
small English vocabulary, so tests and toy models need no hub download.

The merges are learnt by the `tokenizers` BPE trainer until every listed word is one token; any
other word falls back to pieces and characters. Run: python assets/build_tiny_clip_tokenizer.py
"""

import json
import string
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


def build(out: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    chars = sorted(set(string.ascii_lowercase + string.digits + string.punctuation))
    specials = ["<|startoftext|>", "<|endoftext|>"]
    tok = Tokenizer(models.BPE(end_of_word_suffix="</w>", unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=4096, special_tokens=specials, initial_alphabet=chars,
                                  end_of_word_suffix="</w>", show_progress=False)
    tok.train_from_iterator([" ".join(WORDS)] * 2, trainer)
    out.mkdir(parents=True, exist_ok=True)
    tok.model.save(str(out))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
    }, indent=2) + "\n")
    print(f"wrote {out}: {tok.get_vocab_size()} tokens")


if __name__ == "__main__":
    build(Path(__file__).parent / "tiny-clip-tokenizer")
