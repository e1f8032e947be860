import itertools
import struct

import pytest
import torch
from hypothesis import given, settings, strategies as st

from lowbit.codec import (Frame, RawCodec, StochasticGradCodec, WeightCodec, grad_codec,
                          join_frames, split_frames, weight_codec)
from lowbit.codec.frame import HEADER_SIZE
from lowbit.errors import ConfigError, FrameError, NonFiniteGradientError


def _gframe(shape=(5, 7), bits=3, seed=0):
    g = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    return StochasticGradCodec(bits).encode(g, key=11, step=42, generator=torch.Generator().manual_seed(1)), g


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_grad_frame_round_trip_and_size(bits):
    codec = StochasticGradCodec(bits)
    f, g = _gframe((33, 17), bits)
    raw = f.to_bytes()
    n = 33 * 17
    assert len(raw) == HEADER_SIZE + 4 * 2 + 4 * 1 + (n * bits + 7) // 8 + 4 == codec.frame_nbytes((33, 17))
    back = Frame.from_bytes(raw, expect_kind="grad", expect_shape=(33, 17), expect_key=11)
    assert back.step == 42 and back.bits == bits and back.shape == (33, 17)
    x = codec.decode(back)
    assert x.shape == g.shape
    assert torch.equal(x, codec.decode(f))  # decoding the parsed frame equals decoding the original


def test_raw_codec_exact():
    x = torch.randn(4, 9)
    f = RawCodec().encode(x)
    back = Frame.from_bytes(f.to_bytes())
    assert torch.equal(RawCodec().decode(back), x)
    assert len(f.to_bytes()) == RawCodec().frame_nbytes((4, 9)) == HEADER_SIZE + 8 + 4 * 36 + 4
    h = RawCodec(torch.float16)
    y = h.decode(Frame.from_bytes(h.encode(x * 1e6).to_bytes()))
    assert torch.isfinite(y).all()  # saturates instead of overflowing to inf


def test_weight_codec_per_row_scales():
    w = torch.randn(6, 10)
    c = WeightCodec("twn", 2, per_row=True)
    f = c.encode(w)
    raw = f.to_bytes()
    assert len(raw) == c.frame_nbytes((6, 10))
    back = Frame.from_bytes(raw)
    assert back.scales.numel() == 6
    wq = c.decode(back)
    for r in range(6):
        assert wq[r].unique().numel() <= 3


def test_empty_and_scalar_tensors():
    for shape in [(0,), (), (1,)]:
        x = torch.randn(shape) if shape != (0,) else torch.empty(0)
        f = RawCodec().encode(x)
        assert torch.equal(RawCodec().decode(Frame.from_bytes(f.to_bytes())), x)


def test_corruption_at_every_byte_is_rejected():
    f, _ = _gframe((4, 6), 3)
    raw = f.to_bytes()
    for i in range(len(raw)):
        bad = bytearray(raw)
        bad[i] ^= 0x5A
        with pytest.raises(FrameError):
            Frame.from_bytes(bytes(bad))


def test_frame_crc_is_zlibs_crc32_of_the_frame():
    """The CRC is computed with zlib-ng when installed: the trailer must stay zlib's CRC-32 (the
    frame format), whichever library wrote or checks it."""
    import zlib
    for shape, bits in (((4, 6), 3), ((300, 7), 2), ((1,), 8)):
        raw = _gframe(shape, bits)[0].to_bytes()
        assert struct.unpack("<I", raw[-4:])[0] == zlib.crc32(raw[:-4])


def test_truncation_at_every_length_is_rejected():
    f, _ = _gframe((3, 3), 4)
    raw = f.to_bytes()
    for n in range(len(raw)):
        with pytest.raises(FrameError, match="truncated|length|CRC|shape|scales"):
            Frame.from_bytes(raw[:n])


def test_specific_messages():
    f, _ = _gframe()
    raw = bytearray(f.to_bytes())
    with pytest.raises(FrameError, match="magic"):
        Frame.from_bytes(b"XXXX" + bytes(raw[4:]))
    v = bytearray(raw)
    v[4] = 9
    with pytest.raises(FrameError, match="version 9"):
        Frame.from_bytes(bytes(v))
    with pytest.raises(FrameError, match="shape"):
        Frame.from_bytes(bytes(raw), expect_shape=(7, 5))
    with pytest.raises(FrameError, match="expected a weight frame"):
        Frame.from_bytes(bytes(raw), expect_kind="weight")
    with pytest.raises(FrameError, match="key"):
        Frame.from_bytes(bytes(raw), expect_key=3)


def test_forged_huge_shape_is_rejected_before_allocation():
    f, _ = _gframe()
    raw = bytearray(f.to_bytes())
    # claim a 2^31 x 2^31 tensor: must fail on the bound, not try to allocate
    struct.pack_into("<2I", raw, HEADER_SIZE, 2**31, 2**31)
    with pytest.raises(FrameError, match="above the bound|payload length"):
        Frame.from_bytes(bytes(raw))
    # an absurd payload length
    struct.pack_into("<Q", raw, 28, 2**60)
    with pytest.raises(FrameError):
        Frame.from_bytes(bytes(raw))


def test_bundle_split():
    frames = [_gframe((3, i + 1), 2, seed=i)[0].to_bytes() for i in range(4)]
    got = list(split_frames(join_frames(frames)))
    assert [g.shape for g in got] == [(3, 1), (3, 2), (3, 3), (3, 4)]
    with pytest.raises(FrameError):
        list(split_frames(join_frames(frames) + b"\x00"))


def test_nonfinite_gradient_policies():
    g = torch.randn(10)
    g[3] = float("nan")
    with pytest.raises(NonFiniteGradientError, match="NaN|Inf"):
        StochasticGradCodec(3).encode(g)
    assert StochasticGradCodec(3, nonfinite="skip").encode(g) is None
    z = StochasticGradCodec(3, nonfinite="zero").encode(g)
    assert torch.equal(StochasticGradCodec(3).decode(z), torch.zeros(10))


@pytest.mark.parametrize("kwargs,match", [
    (dict(bits=0), "2..8"), (dict(bits=9), "2..8"), (dict(bits=3, clip=0.0), "clip"),
    (dict(bits=3, clip=-1.0), "clip"), (dict(bits=3, nonfinite="ignore"), "policy"),
])
def test_bad_codec_config(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        StochasticGradCodec(**kwargs)


def test_codec_factories():
    assert grad_codec(32).bits == 32 and grad_codec(16).bits == 16 and grad_codec(3).bits == 3
    assert weight_codec(2).scheme == "laq-linear" and weight_codec(1).scheme == "binary"
    with pytest.raises(ConfigError):
        weight_codec(4, scheme="nope")


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 9), cols=st.integers(1, 9), bits=st.sampled_from([2, 3, 4, 8]),
       seed=st.integers(0, 1000))
def test_decoded_values_lie_on_grid(rows, cols, bits, seed):
    g = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))
    c = StochasticGradCodec(bits)
    f = Frame.from_bytes(c.encode(g, generator=torch.Generator().manual_seed(seed)).to_bytes())
    x = c.decode(f)
    k = (1 << (bits - 1)) - 1
    s = float(f.scales[0])
    lv = x / s * k
    assert torch.allclose(lv, lv.round(), atol=1e-4)
    assert float(lv.abs().max()) <= k + 1e-4


@settings(max_examples=80, deadline=None)
@given(n=st.integers(0, 300), bits=st.sampled_from([1, 2, 3, 4, 5, 8]), per_row=st.booleans(),
       chunk=st.sampled_from([8, 24, 1 << 15]), small=st.sampled_from([0, 4096]), seed=st.integers(0, 1000))
def test_decode_into_and_accumulate_equal_the_reference(n, bits, per_row, chunk, small, seed):
    """decode_frame(out=) writes exactly what the QTensor path dequantizes, and accumulate=True adds
    it to what ``out`` held, for every width, tails of any length and chunk boundaries anywhere,
    through the chunked table paths (SMALL_FRAME 0) and the whole-frame path for small frames."""
    import lowbit.codec.decode as cc
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cc, "CHUNK_BYTES", chunk)
        mp.setattr(cc, "SMALL_FRAME", small)
        _check_decode_into(n, bits, per_row, seed)


def _check_decode_into(n, bits, per_row, seed):
    from lowbit.codec import decode_frame, qtensor_from_frame
    gen = torch.Generator().manual_seed(seed)
    shape = (3, n // 3) if per_row and n >= 3 else (n,)
    x = torch.randn(*shape, generator=gen)
    if bits in (1, 2, 4, 8) and not (bits == 8 and per_row) and n:  # weight quantizers refuse empty tensors
        f = weight_codec(bits, per_row=per_row).encode(x)
    else:
        f = StochasticGradCodec(max(bits, 2)).encode(x, generator=gen)
    f = Frame.from_bytes(f.to_bytes())
    ref = qtensor_from_frame(f).dequantize(torch.float32).reshape(f.shape)
    buf = torch.full((x.numel(),), 7.0)
    got = decode_frame(f, out=buf)
    assert got.data_ptr() == buf.data_ptr() and got.shape == f.shape
    assert torch.equal(got, ref)
    # a destination aligned to 4 bytes only (a parameter mapped from a safetensors file can be):
    # the byte-table path must not write 16-byte elements there
    odd = torch.full((x.numel() + 1,), 7.0)[1:]
    assert torch.equal(decode_frame(f, out=odd), ref)
    base = torch.randn(x.numel(), generator=gen)
    acc = base.clone()
    decode_frame(f, out=acc, accumulate=True)
    assert torch.equal(acc, base + ref.reshape(-1))
    assert torch.equal(decode_frame(f), ref)  # the allocating path is unchanged


def test_decode_into_raw_frames_and_bad_destinations():
    from lowbit.codec import decode_frame
    x = torch.randn(4, 5)
    f = RawCodec().encode(x)
    buf = torch.zeros(20)
    assert torch.equal(decode_frame(f, out=buf), x)
    decode_frame(f, out=buf, accumulate=True)
    assert torch.equal(buf.view(4, 5), 2 * x)
    g, _ = _gframe((4, 5))
    with pytest.raises(ConfigError, match="contiguous floating tensor of 20 elements"):
        decode_frame(g, out=torch.zeros(21))
    with pytest.raises(ConfigError, match="contiguous floating tensor"):
        decode_frame(g, out=torch.zeros(5, 8)[:, :4])
    with pytest.raises(ConfigError, match="contiguous floating tensor"):
        decode_frame(g, out=torch.zeros(20, dtype=torch.int32))
    with pytest.raises(ConfigError, match="needs an out tensor"):
        decode_frame(g, accumulate=True)


@pytest.mark.parametrize("bits", [2, 3, 4, 5])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("small", [0, 4096])
def test_decode_into_other_float_dtypes(bits, dtype, small, monkeypatch):
    """The table paths write 2..8 values per lookup as one wide element whose width depends on the
    destination dtype (3-bit: 4 values, 8 bytes in fp16, two 16-byte rows in fp64)."""
    import lowbit.codec.decode as cc
    from lowbit.codec import decode_frame, qtensor_from_frame
    monkeypatch.setattr(cc, "SMALL_FRAME", small)
    gen = torch.Generator().manual_seed(bits)
    x = torch.randn(1003, generator=gen)
    f = StochasticGradCodec(bits).encode(x, generator=gen)
    ref = qtensor_from_frame(f).dequantize(torch.float32).to(dtype)
    for out in (torch.empty(1003, dtype=dtype), torch.empty(1004, dtype=dtype)[1:]):
        assert torch.equal(decode_frame(f, out=out), ref)
    base = torch.randn(1003, generator=gen).to(dtype)
    acc = base.clone()
    decode_frame(f, out=acc, accumulate=True)
    assert torch.equal(acc, base + ref)


@pytest.mark.parametrize("encoding", ["sym", "log"])
def test_three_bit_code_seven_is_rejected_in_every_field_position(encoding):
    """Code 7 lies outside the 3-bit symmetric and log grids. The 3-bit decoder reads each group of
    8 codes as one 24-bit word: a 7 in any of its 8 fields, straddling bytes or not, in the first
    or a later chunk, or in the tail, must raise."""
    import lowbit.codec.decode as cc
    from lowbit.codec import decode_frame
    from lowbit.codec.pack import pack_bits
    n = 8 * 40 + 5
    if encoding == "sym":
        f = StochasticGradCodec(3).encode(torch.randn(n))
    else:
        f = weight_codec(3, scheme="laq-log").encode(torch.randn(n))
    assert f.encoding == encoding
    good = decode_frame(f)
    codes = torch.zeros(n, dtype=torch.uint8)
    positions = [0, 1, 2, 3, 5, 7, 8 * 17 + 2, 8 * 39 + 6, n - 1]
    for small, pos in itertools.product((0, 4096), positions):  # chunked (32 values per chunk), whole
        bad_codes = codes.clone()
        bad_codes[pos] = 7
        bad = Frame(kind=f.kind, encoding=f.encoding, dtype=f.dtype, bits=3, shape=f.shape,
                    scales=f.scales, payload=pack_bits(bad_codes, 3), key=f.key, step=f.step)
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(cc, "CHUNK_BYTES", 8)
            mp.setattr(cc, "SMALL_FRAME", small)
            with pytest.raises(FrameError, match="code 7 outside the 3-bit"):
                decode_frame(bad)
            with pytest.raises(FrameError, match="code 7 outside the 3-bit"):
                decode_frame(bad, out=torch.zeros(n), accumulate=True)
            assert torch.equal(decode_frame(f), good)
