"""Where the clients of a round run: one after the other in this process, or on Ray actors."""
from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import Sequence

import torch

from lowbit.sim.client import ClientResult, ClientRunner
from lowbit.sim.config import FedConfig

__all__ = ["SequentialPool", "RayPool"]


class SequentialPool:
    """All clients in this process, one after the other."""

    def __init__(self, cfg: FedConfig, train, splits):
        self.runner = ClientRunner(cfg, train, splits)

    def run_round(self, global_bytes: bytes, clients: Sequence[int], rnd: int) -> list[ClientResult]:
        threads = torch.get_num_threads()
        try:
            return self.runner.run(global_bytes, clients, rnd)
        finally:
            torch.set_num_threads(threads)

    def close(self) -> None:
        pass


class _ActorRunner(ClientRunner):
    def __init__(self, cfg, train, splits):
        torch.set_num_threads(1)
        super().__init__(dataclasses.replace(cfg, threads=1), train, splits)

    def ping(self) -> int:
        return os.getpid()


class RayPool:
    """A few Ray actors, each serving a fixed set of clients (client id mod #actors), so a client's
    error-feedback residual stays where its updates are computed. Calls carry the downlink bytes
    (put in the object store once per round) and return uplink bytes."""

    def __init__(self, cfg: FedConfig, train, splits):
        import ray

        from lowbit.comm.ray import ray_session

        self._session = contextlib.ExitStack()
        self._session.enter_context(ray_session(
            cfg.ray_cpus, temp_dir=cfg.ray_temp_dir or None, address=cfg.address,
            object_store_memory=256 * 1024 * 1024, env_vars={"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}))
        self.ray = ray
        n = cfg.ray_actors or cfg.ray_cpus
        actor = ray.remote(num_cpus=1)(_ActorRunner)
        train_ref = ray.put(train)
        self.actors = [actor.remote(cfg, train_ref, splits) for _ in range(n)]
        ray.get([a.ping.remote() for a in self.actors])

    def run_round(self, global_bytes: bytes, clients: Sequence[int], rnd: int) -> list[ClientResult]:
        ref = self.ray.put(global_bytes)
        groups: dict[int, list[int]] = {}
        for c in clients:
            groups.setdefault(c % len(self.actors), []).append(c)
        futs = [self.actors[a].run.remote(ref, cs, rnd) for a, cs in groups.items()]
        by_id = {r.client: r for rs in self.ray.get(futs) for r in rs}
        return [by_id[c] for c in clients]

    def close(self) -> None:
        for a in self.actors:
            self.ray.kill(a)
        self.actors = []
        self._session.close()
