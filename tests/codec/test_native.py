"""The compiled table decode (lowbit.codec._lut): its own argument checks, the switch, and a large
frame split across codec threads giving the torch path's bits. (Every other codec test also runs
on both paths: tests/codec/conftest.py.)"""
import os
import subprocess
import sys

import pytest
import torch

import lowbit.codec.codecs as cc
from lowbit.codec import StochasticGradCodec, decode_frame
from lowbit.errors import ConfigError

needs_native = pytest.mark.skipif(not cc.native_decode_available(), reason="lowbit.codec._lut was not built")


@needs_native
def test_loop_checks_its_arguments():
    pb, out = torch.zeros(4, dtype=torch.uint8), torch.empty(16)
    tab, one = torch.zeros(256, 4), torch.zeros(4)
    with pytest.raises(ValueError, match="bits must be 1, 2, 3, 4 or 8, got 5"):
        cc._lut.decode(pb.data_ptr(), 4, out.data_ptr(), 4, 5, tab.data_ptr(), one.data_ptr(), 0, False)
    with pytest.raises(ValueError, match="17 codes of 2 bits need 5 payload bytes, got 4"):
        cc._lut.decode(pb.data_ptr(), 4, out.data_ptr(), 17, 2, tab.data_ptr(), one.data_ptr(), 0, False)


def test_switch_refuses_a_missing_module(monkeypatch):
    monkeypatch.setattr(cc, "_lut", None)
    with pytest.raises(ConfigError, match="_lut was not built"):
        cc.set_native_decode(True)
    assert not cc.native_decode_available()


@pytest.mark.timeout(60)
def test_env_var_turns_it_off():
    code = "import lowbit.codec.codecs as c; print(c._NATIVE)"
    env = dict(os.environ, LOWBIT_NATIVE_DECODE="0")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=50)
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr


@needs_native
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_large_frame_on_threads_equals_the_torch_path(bits, monkeypatch):
    """Three codec threads, parts of whole 8-code groups, a tail of 5: into, accumulate, allocate."""
    n = 3 * 4096 + 5
    monkeypatch.setattr(cc, "_NATIVE_PART", 1024)
    x = torch.randn(n, generator=torch.Generator().manual_seed(bits))
    f = StochasticGradCodec(bits).encode(x, generator=torch.Generator().manual_seed(1))
    base = torch.randn(n, generator=torch.Generator().manual_seed(2))
    was, threads = cc.set_native_decode(False), cc.get_codec_threads()
    try:
        ref = decode_frame(f).clone()
        ref_acc = base.clone()
        decode_frame(f, out=ref_acc, accumulate=True)
        cc.set_native_decode(True)
        cc.set_codec_threads(3)
        assert torch.equal(decode_frame(f), ref)
        acc = base.clone()
        decode_frame(f, out=acc, accumulate=True)
        assert torch.equal(acc, ref_acc)
    finally:
        cc.set_native_decode(was)
        cc.set_codec_threads(threads)
