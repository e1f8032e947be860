"""``torchrun --nproc-per-node N -m lowbit.train --transport ring ...``

Reads RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT the usual way (env://). Exit statuses
as ``lowbit train``: 0 done, 2 usage or configuration, 3 this rank failed, 130 stopped."""
from __future__ import annotations

import argparse
import json
import os
import sys

from lowbit.errors import ConfigError


def run(args: argparse.Namespace) -> int:
    from lowbit.train.args import config_from_args
    from lowbit.train.launch import run_rank
    from lowbit.train.preflight import preflight

    cfg = config_from_args(args)
    try:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    except KeyError as e:
        raise ConfigError(f"{e.args[0]} is not set: launch with torchrun, or use `lowbit train`") from None
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    servers = cfg.transport.n_servers
    if world - servers < 1:
        raise ConfigError(f"WORLD_SIZE={world} leaves no worker with {servers} servers")
    cfg.transport.workers = world - servers
    if int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0:
        cfg.run.resume = True  # torchrun --max-restarts restarted the group: continue from the checkpoint
        cfg.run.fault = ""  # injected faults fire on the first attempt only
    cfg, resume = preflight(cfg, quiet=rank != 0)  # every rank checks the same files, rank 0 speaks
    summary = run_rank(rank, world, cfg, local_rank=local_rank, resume=resume)
    if summary is not None:
        print(json.dumps(summary, indent=1))
    return 0


def main(argv=None) -> int:
    from lowbit.errors import guarded
    from lowbit.train.args import add_train_args

    ap = argparse.ArgumentParser(prog="python -m lowbit.train")
    add_train_args(ap)
    args = ap.parse_args(argv)
    return guarded(lambda: run(args), debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
