"""Every codec test runs twice: with the compiled loops (lowbit.codec.native) and with the torch
ops. Both must give the same bits; the compiled run is skipped where the extension was not built."""
import pytest

from lowbit.codec import native


@pytest.fixture(autouse=True, scope="module", params=["native", "torch"])
def codec_path(request):
    if request.param == "native" and not native.native_codec_available():
        pytest.skip("lowbit.codec._native was not built (no C compiler at install): only the torch ops run")
    was = native.set_native_codec(request.param == "native")
    yield request.param
    native.set_native_codec(was)
