"""Every codec test runs twice: with the compiled table decode (lowbit.codec._lut) and with the
torch-op decode. Both must give the same bits; the compiled one is skipped where it was not built."""
import pytest

import lowbit.codec.codecs as cc


@pytest.fixture(autouse=True, scope="module", params=["native", "torch"])
def decode_path(request):
    if request.param == "native" and not cc.native_decode_available():
        pytest.skip("lowbit.codec._lut was not built (no C compiler at install): only the torch-op decode runs")
    was = cc.set_native_decode(request.param == "native")
    yield request.param
    cc.set_native_decode(was)
