"""Delta-coded weight frames: a receiver that applies every delta holds exactly the codes of the
whole frames (all grids and widths, per-tensor and per-row scales); a missed, repeated or corrupted
delta is detected by its digests and a key frame resyncs; malformed deltas are FrameErrors."""
import struct

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from lowbit.codec.codecs import weight_codec
from lowbit.codec.decode import decode_frame
from lowbit.codec.delta import DeltaDecoder, DeltaEncoder, StateMismatch
from lowbit.codec.frame import Frame
from lowbit.errors import FrameError
from lowbit.testing import resealed


def _frames(shape, bits, scheme, per_row, steps, move, seed):
    """Weight frames of a tensor that moves a little each step (key 7, step-stamped)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g)
    codec = weight_codec(bits, scheme, per_row)
    out = []
    for s in range(steps):
        out.append(codec.encode(w, key=7, step=s))
        w = w + move * torch.randn(shape, generator=g)
    return out


def _send(enc, dec, f, **kw):
    b = enc.encode(f, **kw)
    got = dec.apply(Frame.from_bytes(b, expect_kind="weight"))
    return b, got


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=st.integers(1, 40), cols=st.integers(1, 70),
       grid=st.sampled_from([(1, "laq-linear"), (2, "laq-linear"), (3, "laq-linear"), (4, "laq-log"), (5, "laq-linear"),
                             (6, "laq-linear"), (7, "laq-log"), (8, "laq-linear"), (2, "twn")]),
       per_row=st.booleans(), move=st.sampled_from([0.0, 0.001, 0.05, 1.0]), seed=st.integers(0, 1000),
       every=st.sampled_from([0, 3]))
def test_applying_every_delta_gives_the_whole_frames(rows, cols, grid, per_row, move, seed, every):
    bits, scheme = grid
    enc, dec = DeltaEncoder(keyframe_every=every), DeltaDecoder()
    for f in _frames((rows, cols), bits, scheme, per_row, 6, move, seed):
        whole = f.to_bytes()
        b, got = _send(enc, dec, f)
        assert len(b) <= len(whole)
        assert got.step == f.step and got.key == 7
        assert torch.equal(got.payload, f.payload) and torch.equal(got.scales, f.scales)
        assert torch.equal(decode_frame(got), decode_frame(f))  # bit for bit
        if every and f.step % every == 0:
            assert b == whole


def test_small_moves_send_a_small_fraction_and_big_ones_whole_frames():
    enc, dec = DeltaEncoder(), DeltaDecoder()
    frames = _frames((256, 512), 2, "laq-linear", False, 4, 1e-3, 0)
    sizes = [len(_send(enc, dec, f)[0]) for f in frames]
    assert sizes[0] == len(frames[0].to_bytes())
    assert all(s < 0.2 * sizes[0] for s in sizes[1:]), sizes
    # every code changes: the delta would be larger, a whole frame goes
    enc2, dec2 = DeltaEncoder(), DeltaDecoder()
    a, b = _frames((64, 64), 2, "laq-linear", False, 2, 10.0, 1)
    _send(enc2, dec2, a)
    sent, _ = _send(enc2, dec2, b)
    assert Frame.from_bytes(sent).kind == "weight"
    assert enc.full_nbytes == sum(len(f.to_bytes()) for f in frames) and enc.nbytes == sum(sizes)


def test_a_missed_delta_is_detected_and_a_key_frame_resyncs():
    enc, dec = DeltaEncoder(), DeltaDecoder()
    f0, f1, f2, f3 = _frames((32, 48), 3, "laq-linear", False, 4, 0.05, 2)
    _send(enc, dec, f0)
    enc.encode(f1)  # lost on the way
    with pytest.raises(StateMismatch, match="a delta was missed"):
        _send(enc, dec, f2)
    b, got = _send(enc, dec, f3, full=True)  # the owner sends a key frame
    assert Frame.from_bytes(b).kind == "weight" and torch.equal(got.payload, f3.payload)
    f4 = _frames((32, 48), 3, "laq-linear", False, 5, 0.05, 2)[4]
    assert torch.equal(_send(enc, dec, f4)[1].payload, f4.payload)


def test_a_delta_without_held_codes_or_for_other_codes_is_refused():
    enc = DeltaEncoder()
    f0, f1 = _frames((64, 64), 2, "laq-linear", False, 2, 0.01, 3)
    enc.encode(f0)
    delta = Frame.from_bytes(enc.encode(f1))
    assert delta.kind == "wdelta"
    with pytest.raises(StateMismatch, match="no codes are held"):
        DeltaDecoder().apply(delta)
    other = DeltaDecoder()
    other.apply(Frame.from_bytes(weight_codec(4).encode(torch.randn(64, 64), key=7).to_bytes()))
    with pytest.raises(StateMismatch, match="4-bit"):
        other.apply(delta)
    with pytest.raises(FrameError, match="decodes only onto held codes"):
        decode_frame(delta)


@pytest.mark.parametrize("edit,match", [
    (lambda p: p.__setitem__(len(p) - 1, p[len(p) - 1] ^ 0x5A), "changed groups do not inflate"),
    (lambda p: p.__setitem__(8, p[8] ^ 1), "it announces"),
    (lambda p: p.__setitem__(0, p[0] ^ 1), "a delta was missed"),
    (lambda p: struct.pack_into("<I", p, 16, 10**6), "changed groups"),
    (lambda p: p.__setitem__(24, p[24] ^ 0xFF), "group ids"),
])
def test_a_corrupted_delta_is_a_frame_error(edit, match):
    enc, dec = DeltaEncoder(), DeltaDecoder()
    f0, f1 = _frames((40, 40), 2, "laq-linear", False, 2, 0.05, 4)
    _send(enc, dec, f0)
    bad = resealed(enc.encode(f1), edit)
    with pytest.raises(FrameError, match=match):
        dec.apply(Frame.from_bytes(bad))


_DELTA_SEEDS = []
for _bits in (2, 3, 8):
    _e = DeltaEncoder()
    _fs = _frames((40, 64), _bits, "laq-linear", _bits == 3, 2, 0.002, _bits)
    _e.encode(_fs[0])
    _DELTA_SEEDS.append((_fs[0].to_bytes(), _e.encode(_fs[1])))
assert all(Frame.from_bytes(d).kind == "wdelta" for _, d in _DELTA_SEEDS)


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.sampled_from(_DELTA_SEEDS), edits=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)),
                                                           min_size=1, max_size=6),
       cut=st.one_of(st.none(), st.integers(0, 600)))
def test_mutated_delta_frames(seed, edits, cut):
    """A mutated delta either parses, applies and decodes, or raises FrameError: nothing else."""
    key_frame, delta = seed
    buf = bytearray(delta)
    for pos, val in edits:
        buf[pos % len(buf)] = val
    if cut is not None:
        buf = buf[:cut]
    dec = DeltaDecoder()
    dec.apply(Frame.from_bytes(key_frame))
    try:
        f = Frame.from_bytes(bytes(buf))
        assert f.to_bytes() == bytes(buf[: f.nbytes])
        decode_frame(dec.apply(f))
    except FrameError:
        pass


@settings(max_examples=800, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.sampled_from(_DELTA_SEEDS), edits=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)),
                                                           min_size=1, max_size=4))
def test_mutated_delta_payloads_behind_a_valid_crc(seed, edits):
    """Payload edits the CRC does not catch (resealed): the digests and layout checks must."""
    key_frame, delta = seed

    def edit(p):
        for pos, val in edits:
            p[pos % len(p)] = val

    dec = DeltaDecoder()
    dec.apply(Frame.from_bytes(key_frame))
    want = DeltaDecoder()
    want.apply(Frame.from_bytes(key_frame))
    good = want.apply(Frame.from_bytes(delta))
    try:
        got = dec.apply(Frame.from_bytes(resealed(delta, edit)))
    except FrameError:
        return
    assert torch.equal(got.payload, good.payload)  # an edit that applies must not change the codes
