"""Fuzzing the frame decoder: arbitrary bytes and mutated valid frames must either decode to a
frame that re-encodes identically or raise FrameError — never another exception, never a hang,
never a huge allocation."""
import struct
import tracemalloc

import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from lowbit.codec import Frame, StochasticGradCodec, WeightCodec, decode_frame, split_frames
from lowbit.codec.entropy import EntropyCodec
from lowbit.codec.frame import HEADER_SIZE
from lowbit.codec.sparse import RowSparseCodec
from lowbit.errors import FrameError
from lowbit.testing import mutated

_SEEDS = [StochasticGradCodec(b).encode(torch.randn(3, 5), generator=torch.Generator().manual_seed(b)).to_bytes()
          for b in (2, 3, 4, 8)] + [WeightCodec("laq-log", 3, per_row=True).encode(torch.randn(4, 6)).to_bytes()]


def _check(buf: bytes) -> None:
    try:
        f = Frame.from_bytes(buf)
    except FrameError:
        return
    # it parsed: then it must decode and re-serialize to the same bytes it came from
    decode_frame(f)
    assert f.to_bytes() == bytes(buf[: f.nbytes])


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(min_size=0, max_size=200))
def test_random_bytes(buf):
    _check(buf)


@settings(max_examples=2500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.sampled_from(_SEEDS), edits=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)),
                                                     min_size=1, max_size=6),
       cut=st.one_of(st.none(), st.integers(0, 400)))
def test_mutated_frames(seed, edits, cut):
    buf = bytearray(seed)
    for pos, val in edits:
        buf[pos % len(buf)] = val
    if cut is not None:
        buf = buf[:cut]
    _check(bytes(buf))


@settings(max_examples=300, deadline=None)
@given(dims=st.lists(st.integers(0, 2**32 - 1), min_size=1, max_size=8), plen=st.integers(0, 2**64 - 1))
def test_forged_headers_do_not_allocate(dims, plen):
    """Forge shape and payload length fields; the decoder must refuse before allocating."""
    base = bytearray(_SEEDS[0])
    hdr = bytearray(base[:HEADER_SIZE])
    hdr[9] = len(dims)  # ndim
    struct.pack_into("<Q", hdr, 28, plen)
    forged = bytes(hdr) + struct.pack(f"<{len(dims)}I", *dims) + bytes(64)
    tracemalloc.start()
    try:
        try:
            Frame.from_bytes(forged)
        except FrameError:
            pass
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


@settings(max_examples=300, deadline=None)
@given(junk=st.binary(min_size=1, max_size=64))
def test_bundles_with_trailing_junk_are_rejected(junk):
    try:
        list(split_frames(_SEEDS[0] + junk))
    except FrameError:
        return
    raise AssertionError("a bundle with trailing junk was accepted")


def _sparse_grad():
    g = torch.zeros(200, 16)
    g[torch.randperm(200, generator=torch.Generator().manual_seed(5))[:12]] = 1.0
    return g


# frame kinds with payloads of their own layout: resealed edits get past the CRC to their own checks
_LOSSLESS = [RowSparseCodec(StochasticGradCodec(3)).encode(_sparse_grad(), key=2).to_bytes(),
             EntropyCodec(StochasticGradCodec(3)).encode(torch.randn(200, 16, generator=torch.Generator().manual_seed(5)),
                                                         key=2).to_bytes()]


@settings(max_examples=1200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.sampled_from(_LOSSLESS), edits=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)),
                                                        min_size=1, max_size=5), reseal=st.booleans())
def test_mutated_sparse_and_coded_frames_decode_or_raise_frame_error(seed, edits, reseal):
    try:
        decode_frame(Frame.from_bytes(mutated(seed, edits, reseal)))
    except FrameError:
        pass
