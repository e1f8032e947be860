"""Decoding with several codec threads (lowbit.codec.set_codec_threads): the same bytes out as one
thread, errors raised from any part, and torch's thread settings left as they were."""
import contextlib
import dataclasses
import threading

import pytest
import torch
from hypothesis import given, settings, strategies as st

import lowbit.codec.decode as cc
from lowbit.codec import StochasticGradCodec, decode_frame
from lowbit.codec.threads import get_codec_threads, set_codec_threads
from lowbit.errors import ConfigError, FrameError

from test_frame import _check_decode_into


@contextlib.contextmanager
def codec_threads(n, chunk=None):
    old = get_codec_threads()
    with pytest.MonkeyPatch.context() as mp:
        if chunk is not None:
            mp.setattr(cc, "CHUNK_BYTES", chunk)  # small chunks: many parts even for small tensors
            mp.setattr(cc, "SMALL_FRAME", 0)  # ... which would otherwise decode whole, unthreaded
            mp.setattr(cc, "_NATIVE_PART", chunk)  # the compiled decode's parts, likewise
        set_codec_threads(n)
        try:
            yield
        finally:
            set_codec_threads(old)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(0, 400), bits=st.sampled_from([1, 2, 3, 4, 5, 8]), per_row=st.booleans(),
       threads=st.sampled_from([2, 3, 5]), chunk=st.sampled_from([8, 24]), seed=st.integers(0, 1000))
def test_threaded_decode_equals_the_reference(n, bits, per_row, threads, chunk, seed):
    """Into a buffer, into a 4-byte-aligned buffer, accumulating, and allocating: bit for bit what
    the QTensor path dequantizes, whatever the split into parts."""
    with codec_threads(threads, chunk):
        _check_decode_into(n, bits, per_row, seed)


@pytest.mark.parametrize("bits", [2, 3, 8])
def test_invalid_code_in_the_last_part_is_raised(bits):
    """A code outside the grid in the last chunk (decoded by a pool thread, not the caller) raises
    FrameError naming it; the pool stays usable."""
    x = torch.randn(4096, generator=torch.Generator().manual_seed(0))
    f = StochasticGradCodec(bits).encode(x, generator=torch.Generator().manual_seed(1))
    bad = f.payload.clone()
    bad[-3:] = 0xFF  # all-ones fields: code 2^b - 1, outside the symmetric grid
    with codec_threads(4, chunk=64):
        with pytest.raises(FrameError, match=f"outside the {bits}-bit symmetric grid"):
            decode_frame(dataclasses.replace(f, payload=bad), out=torch.empty(4096))
        out = torch.empty(4096)
        decode_frame(f, out=out)
    with codec_threads(1):
        assert torch.equal(out, decode_frame(f))
        assert x.numel() <= cc.SMALL_FRAME  # and decoded whole, on the small-frame path:
        with pytest.raises(FrameError, match=f"outside the {bits}-bit symmetric grid"):
            decode_frame(dataclasses.replace(f, payload=bad), out=torch.empty(4096), accumulate=True)


def test_pool_leaves_torch_threads_alone():
    """Pool threads run torch single-threaded, but the caller's setting and the default that
    threads started later inherit are what they were."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        x = torch.randn(1 << 16)
        f = StochasticGradCodec(3).encode(x, generator=torch.Generator().manual_seed(0))
        with codec_threads(6, chunk=256):  # a pool larger than any made so far in this process
            decode_frame(f, out=torch.empty(x.numel()))
        assert torch.get_num_threads() == 2
        seen = []
        t = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
        t.start()
        t.join()
        assert seen == [2]
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2"])
def test_bad_thread_counts(bad):
    with pytest.raises(ConfigError, match="codec threads must be an integer >= 1"):
        set_codec_threads(bad)


@pytest.mark.timeout(60)
def test_env_var_sets_and_rejects(python_with_env):
    code = "import lowbit.codec.threads as c; print(c.get_codec_threads())"
    out = python_with_env(code, LOWBIT_CODEC_THREADS="3")
    assert out.returncode == 0 and out.stdout.strip() == "3", out.stderr
    out = python_with_env(code, LOWBIT_CODEC_THREADS="many")
    assert out.returncode != 0 and "LOWBIT_CODEC_THREADS='many'" in out.stderr
