"""Command-line programs; each module has `main(argv) -> int`. `vgpt_jax.cli` dispatches to
them and `tools/*.py` are thin wrappers for running from a checkout."""
