"""decode_sum: S frames of one tensor decoded, summed and divided in one pass (what a server does
with its workers' gradients). It must give exactly the bits of decoding the first frame into the
buffer, adding the others one by one and dividing afterwards, on both codec paths (conftest)."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import lowbit.codec.decode as cc
from lowbit.codec.threads import get_codec_threads, set_codec_threads
from lowbit.codec import Frame, StochasticGradCodec, WeightCodec, decode_frame, decode_sum, native
from lowbit.errors import ConfigError, FrameError


def _frames(n: int, bits: int, s: int, seed: int) -> list[Frame]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(s):
        x = torch.randn(n, generator=gen) * (1.0 + i)  # a scale of its own per frame
        f = StochasticGradCodec(bits).encode(x, key=3, step=1, generator=gen)
        out.append(Frame.from_bytes(f.to_bytes()))  # parsed, as a transport receives it
    return out


def _sequential(frames, base, divisor, accumulate):
    ref = base.clone()
    for i, f in enumerate(frames):
        decode_frame(f, out=ref, accumulate=accumulate or i > 0)
    return ref.div_(divisor) if divisor > 1 else ref


@settings(max_examples=60, deadline=None)
@given(n=st.integers(0, 5000), bits=st.sampled_from([2, 3, 4, 8]), s=st.integers(1, 4),
       divisor=st.integers(1, 4), accumulate=st.booleans(), small=st.sampled_from([0, 4096]),
       seed=st.integers(0, 1000))
def test_equals_decode_add_then_divide(n, bits, s, divisor, accumulate, small, seed):
    """Any length (tails that share a byte with padding, several 2048-value blocks), 1-4 frames,
    any divisor, into or onto the buffer, small 3-bit frames code by code (SMALL_FRAME)."""
    frames = _frames(n, bits, s, seed)
    base = torch.randn(n, generator=torch.Generator().manual_seed(seed + 1))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cc, "SMALL_FRAME", small)
        ref = _sequential(frames, base, divisor, accumulate)
        out = base.clone()
        got = decode_sum(frames, out, divisor=divisor, accumulate=accumulate)
    assert got.data_ptr() == out.data_ptr()
    assert torch.equal(out, ref)


@pytest.mark.parametrize("bits", [1, 2, 4])
def test_weight_grids(bits):
    """LAQ / binary weight frames (the 'bin' grid has no invalid code to check)."""
    gen = torch.Generator().manual_seed(bits)
    scheme = {1: "binary", 2: "laq-linear", 4: "laq-linear"}[bits]
    frames = [Frame.from_bytes(WeightCodec(scheme, bits).encode(torch.randn(777, generator=gen),
                                                                  d=torch.rand(777, generator=gen) + 0.1).to_bytes())
              for _ in range(3)]
    ref = _sequential(frames, torch.zeros(777), 3, False)
    assert torch.equal(decode_sum(frames, torch.empty(777), divisor=3), ref)


def test_threads_split_the_tensor_the_same(monkeypatch):
    if not native.native_codec_enabled():
        pytest.skip("codec threads split the compiled loop only")
    n = 3 * 4096 + 5
    frames = _frames(n, 3, 3, 0)
    ref = _sequential(frames, torch.zeros(n), 3, False)
    threads = get_codec_threads()
    monkeypatch.setattr(cc, "_NATIVE_PART", 1024)
    try:
        set_codec_threads(3)
        assert torch.equal(decode_sum(frames, torch.empty(n), divisor=3), ref)
    finally:
        set_codec_threads(threads)


@pytest.mark.parametrize("n", [5, 4096 + 3, 20000])
def test_a_code_outside_the_grid_names_its_frame(n):
    """Code 7 in the second of three 3-bit frames (at the start, in a whole group, in the tail)."""
    frames = _frames(n, 3, 3, 5)
    for pos in (0, n // 2, n - 1):
        payload = bytearray(frames[1].payload.numpy().tobytes())
        bit = pos * 3
        v = int.from_bytes(payload[bit // 8: bit // 8 + 2].ljust(2, b"\0"), "little") | (7 << (bit % 8))
        payload[bit // 8: bit // 8 + 2] = v.to_bytes(2, "little")[: len(payload) - bit // 8]
        forged = Frame(frames[1].kind, frames[1].encoding, frames[1].dtype, 3, frames[1].shape, frames[1].scales,
                       torch.frombuffer(bytearray(payload), dtype=torch.uint8), key=3, step=1)
        with pytest.raises(FrameError, match="code 7 outside the 3-bit symmetric grid") as e:
            decode_sum([frames[0], forged, frames[2]], torch.empty(n), divisor=3)
        assert e.value.index == 1


def test_bad_arguments_are_named():
    frames = _frames(100, 3, 2, 0)
    with pytest.raises(ConfigError, match="at least one frame"):
        decode_sum([], torch.empty(100))
    with pytest.raises(ConfigError, match="divisor must be an integer >= 1"):
        decode_sum(frames, torch.empty(100), divisor=0)
    with pytest.raises(ConfigError, match="contiguous floating tensor of 100 elements"):
        decode_sum(frames, torch.empty(99))
    with pytest.raises(ConfigError, match="frame 1 has shape"):
        decode_sum([frames[0], _frames(99, 3, 1, 0)[0]], torch.empty(100))
    if native.native_codec_enabled():
        with pytest.raises(ConfigError, match="must share their grid"):
            decode_sum([frames[0], _frames(100, 2, 1, 0)[0]], torch.empty(100))


def test_compiled_loop_checks_its_arguments():
    if not native.native_codec_available():
        pytest.skip("lowbit.codec._native was not built")
    lib = native.lib
    f = _frames(16, 3, 1, 0)[0]
    out, one = torch.empty(16), torch.zeros(8)
    st1 = ((f.payload.data_ptr(), f.payload.numel(), f.scales.data_ptr()),)
    with pytest.raises(ValueError, match="bits must be 1, 2, 3, 4 or 8"):
        lib.decode_sum(out.data_ptr(), 0, 16, 16, 5, 0, one.data_ptr(), 0, st1, 1, False)
    with pytest.raises(ValueError, match="start a multiple of 8"):
        lib.decode_sum(out.data_ptr(), 3, 16, 16, 3, 0, one.data_ptr(), 0, st1, 1, False)
    with pytest.raises(ValueError, match="need 6 payload bytes, got 5"):
        lib.decode_sum(out.data_ptr(), 0, 16, 16, 3, 0, one.data_ptr(), 0,
                       ((f.payload.data_ptr(), 5, f.scales.data_ptr()),), 1, False)
    with pytest.raises(ValueError, match="1..64 streams"):
        lib.decode_sum(out.data_ptr(), 0, 16, 16, 3, 0, one.data_ptr(), 0, (), 1, False)
    with pytest.raises(TypeError, match="a stream is"):
        lib.decode_sum(out.data_ptr(), 0, 16, 16, 3, 0, one.data_ptr(), 0, ((1, 2),), 1, False)


def test_threads_racing_for_the_cached_tables():
    """Threads that miss the table caches at the same moment (a Ray actor's concurrent pushes):
    lru_cache keeps only one thread's table, so the decode must hold the one it was given while the
    compiled loop reads it (a bare ``.data_ptr()`` of the cached call can point into freed memory)."""
    import threading
    frames = {n: _frames(n, bits, 1, n)[0] for n, bits in ((7, 3), (30, 3), (12, 2), (5000, 3), (100, 4))}
    refs = {n: _sequential([f], torch.zeros(n), 1, False) for n, f in frames.items()}
    bad = []
    for _ in range(30):
        cc._code_values.cache_clear()
        cc._bad_entries.cache_clear()
        start = threading.Barrier(8)

        def work():
            start.wait()
            for n, f in frames.items():
                if not torch.equal(decode_frame(f), refs[n]):
                    bad.append(n)

        threads = [threading.Thread(target=work) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not bad, f"wrong values for frames of {sorted(set(bad))} values"
