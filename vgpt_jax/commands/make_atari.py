"""Record Atari episodes (frames + the action before each frame, a random policy) into a
latent store, for action-conditioned training (`vgpt_jax.data.atari`; the `atari` extra):

    vgpt make-atari --game breakout --output runs/atari/latents --episodes 256 --frames 16 --size 32
    vgpt train --config configs/atari_actions.py --workdir runs/atari/train \
        --config.data.store=runs/atari/latents

Each record's `extra` holds `actions` (one-hot over the game's minimal action set, one per
frame), `game` and `action_names`.
"""
from __future__ import annotations

import sys
def main(argv=None) -> int:
    import argparse
    import json
    p = argparse.ArgumentParser(prog="vgpt make-atari", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--game", default="breakout", help="an ale-py ROM id (breakout, pong, ...)")
    p.add_argument("--output", required=True, help="the latent store to write")
    p.add_argument("--episodes", type=int, default=64)
    p.add_argument("--frames", type=int, default=16, help="frames per episode")
    p.add_argument("--size", type=int, default=32,
                   help="frame side, px (square; a multiple of the latent downsample x patch)")
    p.add_argument("--frame-skip", type=int, default=4, help="emulator frames per frame")
    p.add_argument("--hold", type=float, default=4.0,
                   help="the random policy holds an action this many frames on average")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--split", default="train")
    p.add_argument("--latent-space", default="space_to_depth:4")
    p.add_argument("--normalize", choices=["none", "shift", "shift_scale"], default="shift_scale")
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)
    for flag, value in (("--episodes", args.episodes), ("--frames", args.frames),
                        ("--size", args.size), ("--frame-skip", args.frame_skip)):
        if value < 1:
            raise ValueError(f"{flag}={value}: must be >= 1")
    from vgpt_jax.data.atari import record_episodes
    from vgpt_jax.data.ingest import ingest_arrays
    episodes = record_episodes(args.game, args.episodes, args.frames, args.size, args.seed,
                               args.split, args.frame_skip, args.hold)
    store = ingest_arrays(
        ((e.frames, e.fps, e.name, {"actions": e.actions.tolist(), "game": e.game,
                                    "action_names": list(e.action_names)}) for e in episodes),
        args.output, latent_space=args.latent_space, overwrite=args.overwrite,
        normalize=args.normalize, settings={"source": f"atari:{args.game}"})
    print(json.dumps({"episodes": len(store), "frames": args.frames, "game": args.game,
                      "action_dim": int(episodes[0].actions.shape[1]),
                      "actions": list(episodes[0].action_names), "output": args.output}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
