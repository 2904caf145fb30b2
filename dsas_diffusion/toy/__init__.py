"""Toy worlds: small models the project trains itself, in which the presence of a concept is
measured by exact rules instead of a learned judge.

- `dsas_diffusion.toy.lm_world`: templated English sentences whose concept is a small vocabulary
  of mild insults; the data generator, the exact rules and `evaluate_lm` for steering sweeps.
- `dsas_diffusion.toy.train_lm`: trains the small GPT-2-style model shipped in `assets/toy-lm`.

Submodules are imported explicitly (`from dsas_diffusion.toy import lm_world`); nothing is
imported here, so `import dsas_diffusion` never pays for them.
"""
