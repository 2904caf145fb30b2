"""`python -m dsas_diffusion` (and `accelerate launch -m dsas_diffusion`) runs the `dsas` command."""

from dsas_diffusion.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
