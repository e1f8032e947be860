"""Every codec test runs with the compiled loops (lowbit.codec.native), with them but without their
AVX2 path (the scalar loops a CPU without AVX2 runs) and with the torch ops. All must give the same
bits; a compiled run is skipped where the extension was not built (or the CPU has no AVX2)."""
import pytest

from lowbit.codec import native


@pytest.fixture(autouse=True, scope="module", params=["native", "native-scalar", "torch"])
def codec_path(request):
    if request.param != "torch" and not native.native_codec_available():
        pytest.skip("lowbit.codec._native was not built (no C compiler at install): only the torch ops run")
    simd = native.lib.simd(-1) if native.native_codec_available() else False
    if request.param == "native-scalar":
        if not simd:
            pytest.skip("the CPU has no AVX2 (or it is off): the 'native' run already is the scalar loops")
        native.lib.simd(0)
    was = native.set_native_codec(request.param != "torch")
    yield request.param
    native.set_native_codec(was)
    if native.native_codec_available():
        native.lib.simd(1 if simd else 0)
