"""Run the `vgpt` CLI as one process of a `jax.distributed` group on localhost.

    python cli_distributed.py PORT PROCESS_ID NUM_PROCESSES VGPT_ARGS...
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import jax  # noqa: E402


def main() -> int:
    port, process_id, count = (int(a) for a in sys.argv[1:4])
    # A generous shutdown barrier for the loaded 2-core CI box. (Its one CI failure, process 0
    # still in an all-gather, was the signature of a process that had raised and left; the
    # ingestion job now reports such a failure on every process instead.)
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=count,
                               process_id=process_id, initialization_timeout=120,
                               heartbeat_timeout_seconds=60, shutdown_timeout_seconds=180,
                               coordinator_bind_address=f"127.0.0.1:{port}")
    from vgpt_jax import cli
    return cli.main(sys.argv[4:])


if __name__ == "__main__":
    sys.exit(main())
