"""lowbit's quantized links inside a Flower app (``pip install 'lowbit[flower]'``, flwr >= 1.20's
Message API). Two changed lines on each side of an existing app::

    # server_app.py
    from lowbit.integrations.flower import LowbitStrategy
    strategy = LowbitStrategy(FedAvg(fraction_train=0.1), up_bits=3, down_bits=2)

    # client_app.py
    from lowbit.integrations.flower import lowbit_mod
    app = ClientApp(mods=[lowbit_mod])

One round, as data (the same links as ``lowbit simulate``, :mod:`lowbit.sim.federated`)::

    LowbitStrategy.configure_train   global fp32 arrays -> LAQ weight frames (matrices, down_bits),
                                     fp32 frames (1-D) -> one ConfigRecord "lowbit" per message
    lowbit_mod (client, incoming)    frames -> float32 ArrayRecord the ClientApp trains from (start)
    lowbit_mod (client, reply)       Δ = trained − start (+ residual e) -> clipped stochastic up_bits
                                     frames; e ← Δ + e − decode kept in the node's Context.state
    LowbitStrategy.aggregate_train   frames -> arrays = global + Δ, then the wrapped strategy
                                     (FedAvg, FedAdam, ...) aggregates them as it always does

The wrapped strategy samples the nodes, weights the clients and keeps its own state; lowbit only
changes what crosses the links. A reply whose frames do not decode (``FrameError``) is dropped as
a failure and counted; the round goes on with the others. Bytes are counted with Flower's own
``count_bytes`` of every record sent and received (:attr:`LowbitStrategy.rounds`), and
:class:`CountBytes` counts a plain strategy the same way for a baseline.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import torch

from lowbit.codec.frame import split_frames
from lowbit.errors import ConfigError, FrameError
from lowbit.quant.grads import ErrorFeedback
from lowbit.sim.config import LINK_BITS, mix_seed
from lowbit.sim.links import LinkSpec, decode_tensors, encode_tensors, link_spec

try:
    from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
    from flwr.serverapp.strategy import Strategy
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError("lowbit.integrations.flower needs Flower: pip install 'lowbit[flower]'") from e

__all__ = ["LowbitStrategy", "CountBytes", "lowbit_mod", "RoundBytes", "KEY"]

KEY = "lowbit"             # the ConfigRecord that carries the frames, both ways
RAW_KEY = "lowbit.raw"     # non-float arrays (integer buffers) travel untouched in this ArrayRecord
_RESIDUAL = "lowbit.residual"
log = logging.getLogger("lowbit.flower")


# --------------------------------------------------------------------------- records <-> frames


def _floating(a: np.ndarray) -> bool:
    return np.issubdtype(a.dtype, np.floating)


def _plan(names: list[str], shapes: list[tuple[int, ...]], cfg: dict) -> list[LinkSpec]:
    return [link_spec(i, n, s, up_bits=cfg["up_bits"], down_bits=cfg["down_bits"], clip=cfg["clip"],
                      per_row=cfg["per_row"]) for i, (n, s) in enumerate(zip(names, shapes))]


def _link_config(rec: ConfigRecord) -> dict:
    clip = float(rec["clip"])
    return {"up_bits": int(rec["up_bits"]), "down_bits": int(rec["down_bits"]),
            "clip": clip if clip > 0 else None, "per_row": bool(rec["per_row"]),
            "error_feedback": bool(rec["error_feedback"])}


def _split_arrays(content: RecordDict) -> tuple[str, ArrayRecord, RecordDict]:
    """The message's one ArrayRecord (its key and value) and the rest of its records."""
    keys = [k for k in content.array_records if k != RAW_KEY]
    if len(keys) != 1:
        raise ConfigError(f"lowbit's Flower links expect one ArrayRecord per message, found {keys}")
    rest = RecordDict({k: v for k, v in content.items() if k != keys[0]})
    return keys[0], content[keys[0]], rest


def _frames_of(rec: ConfigRecord) -> bytes:
    data = rec.get("frames")
    if not isinstance(data, bytes):
        raise FrameError("the lowbit record carries no frames")
    return data


def _with(rest: RecordDict, records: dict) -> RecordDict:
    """``rest`` plus ``records``, leaving out empty ArrayRecords."""
    out = RecordDict({k: v for k, v in rest.items()})
    for k, v in records.items():
        if not (isinstance(v, ArrayRecord) and len(v) == 0 and k == RAW_KEY):
            out[k] = v
    return out


def _array_record(arrays: dict) -> ArrayRecord:
    """An ArrayRecord from numpy arrays or Flower Arrays, in the given order."""
    if not arrays:
        return ArrayRecord()
    return ArrayRecord({k: a if isinstance(a, Array) else Array(np.ascontiguousarray(a)) for k, a in arrays.items()})


def _without(content: RecordDict, *keys: str) -> RecordDict:
    return RecordDict({k: v for k, v in content.items() if k not in keys})


def _count(content: RecordDict) -> int:
    return sum(r.count_bytes() for r in content.values())


# --------------------------------------------------------------------------- server


@dataclass
class RoundBytes:
    """What crossed the links in one round: bytes down (every message sent, train and evaluate),
    bytes up (every reply received) and the replies dropped for bad frames."""

    round: int
    down: int = 0
    up: int = 0
    sent: int = 0
    replies: int = 0
    dropped: int = 0
    reasons: list[str] = field(default_factory=list)


class CountBytes(Strategy):
    """Wraps any Flower strategy and counts the bytes of the messages it sends and receives
    (Flower's ``count_bytes`` of every record), per round in :attr:`rounds`. Behaviour is the
    wrapped strategy's."""

    def __init__(self, strategy: Strategy):
        if not isinstance(strategy, Strategy):
            raise ConfigError(f"expected a Flower Strategy to wrap, got {type(strategy).__name__}")
        self.strategy = strategy
        self.rounds: dict[int, RoundBytes] = {}

    def _round(self, rnd: int) -> RoundBytes:
        return self.rounds.setdefault(rnd, RoundBytes(rnd))

    def _sent(self, rnd: int, messages: Iterable[Message]) -> list[Message]:
        messages = list(messages)
        r = self._round(rnd)
        r.sent += len(messages)
        r.down += sum(_count(m.content) for m in messages)
        return messages

    def _received(self, rnd: int, replies: Iterable[Message]) -> list[Message]:
        replies = list(replies)
        r = self._round(rnd)
        r.replies += len(replies)
        r.up += sum(_count(m.content) for m in replies if m.has_content())
        return replies

    def configure_train(self, server_round, arrays, config, grid):
        return self._sent(server_round, self.strategy.configure_train(server_round, arrays, config, grid))

    def aggregate_train(self, server_round, replies):
        return self.strategy.aggregate_train(server_round, self._received(server_round, replies))

    def configure_evaluate(self, server_round, arrays, config, grid):
        return self._sent(server_round, self.strategy.configure_evaluate(server_round, arrays, config, grid))

    def aggregate_evaluate(self, server_round, replies):
        return self.strategy.aggregate_evaluate(server_round, self._received(server_round, replies))

    def summary(self) -> None:
        self.strategy.summary()

    def total(self) -> dict[str, int]:
        return {"down": sum(r.down for r in self.rounds.values()), "up": sum(r.up for r in self.rounds.values()),
                "dropped": sum(r.dropped for r in self.rounds.values())}


class LowbitStrategy(CountBytes):
    """Wraps any Flower strategy so that both links carry lowbit frames: LAQ weights at
    ``down_bits`` to the clients, clipped stochastic ``up_bits`` codes of their updates back (with
    a per-client residual when ``error_feedback``); 1-D tensors go fp32, 32 bits means fp32
    everywhere. The clients need :func:`lowbit_mod`; it takes these settings from the messages."""

    def __init__(self, strategy: Strategy, up_bits: int = 3, down_bits: int = 2, clip: float | None = 3.0,
                 error_feedback: bool = True, per_row: bool = False):
        super().__init__(strategy)
        if up_bits not in LINK_BITS or down_bits not in LINK_BITS:
            raise ConfigError(f"up_bits and down_bits must be in {LINK_BITS}, got {up_bits!r} and {down_bits!r}")
        if clip is not None and not clip > 0:
            raise ConfigError(f"clip must be > 0 or None, got {clip!r}")
        self.link = {"up_bits": up_bits, "down_bits": down_bits, "clip": clip, "per_row": bool(per_row),
                     "error_feedback": bool(error_feedback)}
        self._global: dict[int, tuple[list[str], list[torch.Tensor], ArrayRecord]] = {}
        self.arrays_key = "arrays"

    def _encode_down(self, rnd: int, arrays: ArrayRecord) -> tuple[ConfigRecord, ArrayRecord]:
        names = [k for k in arrays if _floating(arrays[k].numpy())]
        raw = _array_record({k: arrays[k] for k in arrays if k not in names})
        tensors = [torch.from_numpy(np.ascontiguousarray(arrays[k].numpy(), dtype=np.float32)) for k in names]
        plan = _plan(names, [tuple(t.shape) for t in tensors], self.link)
        frames = encode_tensors(plan, tensors, "down", step=rnd)
        self._global[rnd] = (names, tensors, raw)
        self._global.pop(rnd - 2, None)
        rec = ConfigRecord({"frames": frames, "names": names, "round": rnd, "arrays_key": self.arrays_key,
                            "up_bits": self.link["up_bits"],
                            "down_bits": self.link["down_bits"], "clip": float(self.link["clip"] or 0.0),
                            "per_row": self.link["per_row"], "error_feedback": self.link["error_feedback"]})
        return rec, raw

    def _encoded(self, rnd: int, arrays: ArrayRecord, messages: Iterable[Message]) -> list[Message]:
        messages = list(messages)
        if messages:
            self.arrays_key = _split_arrays(messages[0].content)[0]
            rec, raw = self._encode_down(rnd, arrays)
            for m in messages:  # strategies may share one RecordDict between messages
                _, _, rest = _split_arrays(m.content)
                m.content = _with(rest, {KEY: rec, RAW_KEY: raw})
        return self._sent(rnd, messages)

    def configure_train(self, server_round, arrays, config, grid):
        return self._encoded(server_round, arrays,
                             self.strategy.configure_train(server_round, arrays, config, grid))

    def configure_evaluate(self, server_round, arrays, config, grid):
        return self._encoded(server_round, arrays,
                             self.strategy.configure_evaluate(server_round, arrays, config, grid))

    def _decode_up(self, rnd: int, content: RecordDict) -> RecordDict:
        names, start, raw = self._global[rnd]
        rec = content.config_records.get(KEY)
        if rec is None:
            raise FrameError("the reply carries no lowbit record (is lowbit_mod in the ClientApp's mods?)")
        plan = _plan(names, [tuple(t.shape) for t in start], self.link)
        deltas = decode_tensors(plan, _frames_of(rec), "up")
        arrays = {n: (s + d).numpy() for n, s, d in zip(names, start, deltas)}
        arrays.update(content.array_records.get(RAW_KEY, {}))
        return _with(_without(content, KEY, RAW_KEY), {self.arrays_key: _array_record(arrays)})

    def aggregate_train(self, server_round, replies):
        kept = []
        r = self._round(server_round)
        for m in self._received(server_round, replies):
            if m.has_error():
                kept.append(m)
                continue
            try:
                m.content = self._decode_up(server_round, m.content)
            except FrameError as e:
                r.dropped += 1
                r.reasons.append(f"node {m.metadata.src_node_id}: {e}")
                log.warning("lowbit: dropped the reply of node %s in round %s: %s",
                            m.metadata.src_node_id, server_round, e)
                continue
            kept.append(m)
        return self.strategy.aggregate_train(server_round, kept)


# --------------------------------------------------------------------------- client


def _residuals(ctxt: Context) -> ErrorFeedback:
    rec = ctxt.state.array_records.get(_RESIDUAL)
    ef = ErrorFeedback()
    if rec is not None:
        ef.residuals = {k: torch.from_numpy(a.numpy().copy()) for k, a in rec.items()}
    return ef


def lowbit_mod(msg: Message, ctxt: Context, call_next) -> Message:
    """Flower client mod: decodes the lowbit frames of an incoming message into the ArrayRecord the
    ClientApp expects, and encodes a training reply's update as lowbit frames (the settings come
    from the server's :class:`LowbitStrategy`). Messages without lowbit frames pass untouched."""
    rec = msg.content.config_records.get(KEY) if msg.has_content() else None
    if rec is None:
        return call_next(msg, ctxt)
    link = _link_config(rec)
    names = list(rec["names"])
    frames = list(split_frames(_frames_of(rec)))
    plan = _plan(names, [tuple(f.shape) for f in frames], link)
    start = decode_tensors(plan, frames, "down")
    arrays = {n: t.numpy() for n, t in zip(names, start)}
    arrays.update(msg.content.array_records.get(RAW_KEY, {}))
    msg.content = _with(_without(msg.content, KEY, RAW_KEY), {str(rec["arrays_key"]): _array_record(arrays)})

    reply = call_next(msg, ctxt)
    if reply.has_error() or msg.metadata.message_type != MessageType.TRAIN:
        return reply
    key, trained, rest = _split_arrays(reply.content)
    missing = [n for n in names if n not in trained]
    if missing:
        raise ConfigError(f"the ClientApp's reply lacks arrays it was sent: {missing[:5]}")
    delta = [torch.from_numpy(np.asarray(trained[n].numpy(), dtype=np.float32)) - s for n, s in zip(names, start)]
    ef = _residuals(ctxt) if link["error_feedback"] else None
    rnd = int(rec["round"])
    gen = torch.Generator().manual_seed(mix_seed(ctxt.node_id, rnd))
    up = encode_tensors(plan, delta, "up", step=rnd, generator=gen, ef=ef)
    if ef is not None:
        ctxt.state[_RESIDUAL] = _array_record({k: v.numpy() for k, v in ef.residuals.items()})
    raw = _array_record({k: trained[k] for k in trained if k not in names})
    reply.content = _with(rest, {KEY: ConfigRecord({"frames": up}), RAW_KEY: raw})
    return reply
