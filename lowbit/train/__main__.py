"""``torchrun --nproc-per-node N -m lowbit.train --transport ring ...``

Reads RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT the usual way (env://)."""
from __future__ import annotations

import argparse
import json
import os
import sys

from lowbit.cli import add_train_args, config_from_args
from lowbit.errors import ConfigError


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lowbit.train")
    add_train_args(ap)
    args = ap.parse_args(argv)
    cfg = config_from_args(args)
    try:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    except KeyError as e:
        raise ConfigError(f"{e.args[0]} is not set: launch with torchrun, or use `lowbit train`") from None
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    servers = cfg.transport.servers if cfg.transport.kind == "ps" else 0
    if world - servers < 1:
        raise ConfigError(f"WORLD_SIZE={world} leaves no worker with {servers} servers")
    cfg.transport.workers = world - servers
    if int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0:
        cfg.run.resume = True  # torchrun --max-restarts restarted the group: continue from the checkpoint
        cfg.run.fault = ""  # injected faults fire on the first attempt only
    cfg.validate()
    from lowbit.train.loop import run_rank

    summary = run_rank(rank, world, cfg, "env://", local_rank)
    if summary is not None:
        print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
