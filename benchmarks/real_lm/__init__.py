"""The paper's protocol at small scale on a real pretrained model (SmolLM2-135M-Instruct): plain steering
against DSAS on a toxicity task and a topic task, held-out prompts, Pareto fronts.

    python -m benchmarks.real_lm --quick    # a smoke run
    python -m benchmarks.real_lm            # the full sweep (benchmarks/results/real_lm.{json,md,png})
"""
