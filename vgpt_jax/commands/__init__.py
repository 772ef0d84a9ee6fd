"""Command-line programs; each module has `main(argv) -> int`. `vgpt_jax.cli` dispatches to
them and `tools/*.py` are thin wrappers for running from a checkout."""


def start_config_run(argv, config_flag, workdir_flag) -> None:
    """The checks and logging of an absl `--config FILE --workdir DIR` command (`vgpt train`,
    `vgpt segment-finetune`): no stray arguments, both flags given."""
    import logging

    from absl import app
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    if config_flag.value is None or not workdir_flag.value:
        raise app.UsageError("--config and --workdir are required")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
