"""The compiled codec loops (lowbit.codec._native): their own argument checks, the switch, and large
frames split across codec threads giving the torch path's bits. (Every other codec test also runs on
both paths: tests/codec/conftest.py.)"""
import pytest
import torch

import lowbit.codec.decode as cc
from lowbit.codec.threads import get_codec_threads, set_codec_threads
from lowbit.codec import StochasticGradCodec, decode_frame, native
from lowbit.errors import ConfigError

needs_native = pytest.mark.skipif(not native.native_codec_available(), reason="lowbit.codec._native was not built")


@needs_native
def test_loops_check_their_arguments():
    pb, out = torch.zeros(4, dtype=torch.uint8), torch.empty(16)
    tab, one = torch.zeros(256, 4), torch.zeros(4)
    lib = native.lib
    with pytest.raises(ValueError, match="bits must be 1, 2, 3, 4 or 8, got 5"):
        lib.decode(pb.data_ptr(), 4, out.data_ptr(), 4, 5, tab.data_ptr(), one.data_ptr(), 0, False)
    with pytest.raises(ValueError, match="17 codes of 2 bits need 5 payload bytes, got 4"):
        lib.decode(pb.data_ptr(), 4, out.data_ptr(), 17, 2, tab.data_ptr(), one.data_ptr(), 0, False)
    codes = torch.zeros(17, dtype=torch.uint8)
    with pytest.raises(ValueError, match="17 codes of 3 bits need 7 bytes, got 4"):
        lib.pack(codes.data_ptr(), 17, 3, pb.data_ptr(), 4)
    with pytest.raises(ValueError, match="bits must be in 1..8, got 9"):
        lib.pack(codes.data_ptr(), 17, 9, pb.data_ptr(), 20)


def test_switch_refuses_a_missing_module(monkeypatch):
    monkeypatch.setattr(native, "lib", None)
    with pytest.raises(ConfigError, match="_native was not built"):
        native.set_native_codec(True)
    assert not native.native_codec_available()


@pytest.mark.timeout(60)
def test_env_var_turns_it_off(python_with_env):
    out = python_with_env("from lowbit.codec import native; print(native.native_codec_enabled())",
                          LOWBIT_NATIVE_CODEC="0")
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr


@needs_native
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_large_frame_on_threads_equals_the_torch_path(bits, monkeypatch):
    """Three codec threads, parts of whole 8-code groups, a tail of 5: the encoded bytes, and the
    decode into a buffer, accumulating and allocating."""
    n = 3 * 4096 + 5
    monkeypatch.setattr(cc, "_NATIVE_PART", 1024)
    x = torch.randn(n, generator=torch.Generator().manual_seed(bits))
    base = torch.randn(n, generator=torch.Generator().manual_seed(2))

    def encode():
        return StochasticGradCodec(bits).encode(x, generator=torch.Generator().manual_seed(1))

    was, threads = native.set_native_codec(False), get_codec_threads()
    try:
        f = encode()
        ref = decode_frame(f).clone()
        ref_acc = base.clone()
        decode_frame(f, out=ref_acc, accumulate=True)
        native.set_native_codec(True)
        set_codec_threads(3)
        assert torch.equal(encode().payload, f.payload)
        assert torch.equal(decode_frame(f), ref)
        acc = base.clone()
        decode_frame(f, out=acc, accumulate=True)
        assert torch.equal(acc, ref_acc)
    finally:
        native.set_native_codec(was)
        set_codec_threads(threads)


@pytest.fixture
def nt_threshold():
    """The streaming-store threshold of decode_sum, restored after the test."""
    was = native.lib.nt_stores(-1)
    yield native.lib.nt_stores
    native.lib.nt_stores(was)


@needs_native
@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("offset", [0, 1], ids=["aligned", "unaligned"])
def test_streaming_stores_give_the_plain_stores_bits(bits, offset, nt_threshold, monkeypatch):
    """decode_sum with streaming stores (threshold 0: every call that does not accumulate) writes the
    same bits as with plain ones (threshold out of reach), one stream and two, with a division, on
    three codec threads, into a 32-byte aligned buffer and (offset 1: an unaligned view, which
    keeps the plain stores) not; an accumulating call is left alone."""
    from lowbit.codec import decode_sum
    from lowbit.codec.frame import Frame

    n = 3 * 4096 + 5
    monkeypatch.setattr(cc, "_NATIVE_PART", 1024)
    frames = [Frame.from_bytes(StochasticGradCodec(bits).encode(
        torch.randn(n, generator=torch.Generator().manual_seed(s)), generator=torch.Generator().manual_seed(9 + s)
    ).to_bytes()) for s in range(2)]
    base = torch.randn(n, generator=torch.Generator().manual_seed(5))
    threads = get_codec_threads()
    try:
        set_codec_threads(3)
        results = {}
        for mode, threshold in (("plain", 1 << 62), ("nt", 0)):
            assert nt_threshold(threshold) == threshold
            for S, divisor, acc in ((1, 1, False), (2, 2, False), (2, 1, True)):
                store = torch.empty(n + 16)
                out = store[offset:offset + n]
                assert (out.data_ptr() % 32 == 0) == (offset == 0)
                if acc:
                    out.copy_(base)
                decode_sum(frames[:S], out, divisor=divisor, accumulate=acc)
                results[mode, S, divisor, acc] = out.clone()
        for key in [k for k in results if k[0] == "plain"]:
            assert torch.equal(results[("nt",) + key[1:]], results[key]), key
        ref = (decode_frame(frames[0]) + decode_frame(frames[1])) / 2
        assert torch.equal(results["nt", 2, 2, False], ref)
    finally:
        set_codec_threads(threads)


@needs_native
def test_streaming_store_threshold_reads_and_sets(nt_threshold):
    was = nt_threshold(-1)
    assert was >= 0
    assert nt_threshold(123) == 123 and nt_threshold(-1) == 123
