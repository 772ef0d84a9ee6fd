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


def add_sampler_arguments(p) -> None:
    """The sampler's flags shared by `vgpt sample`, `vgpt eval` and `vgpt physics-iq generate`,
    with `sampling.SamplerConfig`'s defaults (the release's)."""
    from vgpt_jax import sampling
    defaults = sampling.SamplerConfig()
    p.add_argument("--steps", type=int, default=defaults.steps, help="Euler steps per clip")
    p.add_argument("--guidance", type=float, default=defaults.guidance,
                   help="history guidance scale (1: none)")
    p.add_argument("--time-shift", type=float, default=defaults.time_shift,
                   help="s in sigma / (sigma + s - s sigma): s > 1 spends more steps at high noise")
    p.add_argument("--window", type=int, default=defaults.window,
                   help="the sampler's history window in frames (the trained length keeps a "
                        "long rollout within what the model saw)")
    p.add_argument("--context-noise", type=float, default=defaults.context_noise,
                   help="noise c of generated frames joining the history: (1 - c) x + c eps")
