"""Toy worlds: small models the project trains itself, in which the presence of a concept is
measured by exact rules instead of a learned judge.

- `dsas_diffusion.toy.lm_world`: templated English sentences whose concept is a small vocabulary
  of mild insults; the data generator, the exact rules, the held-out prompts and fitting sets.
- `dsas_diffusion.toy.lm_eval`: `evaluate_lm` (one steering setting on the held-out prompts) and
  `sweep` (plain steering vs DSAS over strengths), for tests and benchmarks.
- `dsas_diffusion.toy.train_lm`: trains the small GPT-2-style model shipped in `assets/toy-lm`.
- `dsas_diffusion.toy.t2i_world`, `t2i_eval`, `train_t2i`: the text-to-image world (flat shapes
  whose colour is read off the pixels) and its shipped model in `assets/toy-t2i`.
- `dsas_diffusion.toy.train_dit`: the same world on a PixArt-Σ transformer, its captions in
  several phrasings (`t2i_world.phrasings`), shipped in `assets/toy-dit`.

Submodules are imported explicitly (`from dsas_diffusion.toy import lm_world`); nothing is
imported here, so `import dsas_diffusion` never pays for them.
"""
