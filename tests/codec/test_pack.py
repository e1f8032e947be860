import pytest
import torch
from hypothesis import given, settings, strategies as st

from lowbit.codec.pack import pack_bits, packed_nbytes, unpack_bits
from lowbit.errors import ConfigError

BITS = [1, 2, 3, 4, 5, 6, 7, 8]


@settings(max_examples=60, deadline=None)
@given(bits=st.sampled_from(BITS), n=st.integers(0, 200), seed=st.integers(0, 2**31 - 1))
def test_round_trip_any_length(bits, n, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (n,), generator=g, dtype=torch.uint8)
    packed = pack_bits(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.numel() == (n * bits + 7) // 8 == packed_nbytes(n, bits)
    assert torch.equal(unpack_bits(packed, bits, n), codes)


@pytest.mark.parametrize("bits", BITS)
def test_layout_is_little_endian_within_bytes(bits):
    # code j occupies bits [b*j, b*j+b) of the little-endian bit string
    codes = torch.tensor([1] + [0] * 15, dtype=torch.uint8)
    packed = pack_bits(codes, bits)
    assert int(packed[0]) == 1 and int(packed[1:].sum()) == 0
    codes = torch.zeros(16, dtype=torch.uint8)
    codes[1] = (1 << bits) - 1
    bitstring = int.from_bytes(bytes(pack_bits(codes, bits).tolist()), "little")
    assert bitstring == ((1 << bits) - 1) << bits


def test_multidim_input_flattens():
    codes = torch.randint(0, 8, (3, 5, 7), dtype=torch.uint8)
    assert torch.equal(unpack_bits(pack_bits(codes, 3), 3, codes.numel()).reshape(3, 5, 7), codes)


@pytest.mark.parametrize("bits", [0, 9, 16, 2.0])
def test_bad_bits(bits):
    with pytest.raises(ConfigError, match="bit width"):
        pack_bits(torch.zeros(4, dtype=torch.uint8), bits)


def test_wrong_dtype_and_length():
    with pytest.raises(ConfigError, match="uint8"):
        pack_bits(torch.zeros(4, dtype=torch.int32), 2)
    with pytest.raises(ConfigError, match="need 2 bytes"):
        unpack_bits(torch.zeros(3, dtype=torch.uint8), 4, 4)
