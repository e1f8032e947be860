"""Fixtures of the quant extension's tests (lowbit.quant._laq): its AVX2 and scalar loops, and a spy
on its calls."""
import pytest

from lowbit.quant import weights as W


@pytest.fixture(params=["avx2", "scalar"])
def simd(request):
    """Runs a test with the extension's AVX2 loops and again with its scalar ones (skipped where it was
    not built, and the AVX2 run where the CPU has no AVX2); the setting is restored after."""
    if not W.native_laq_available():
        pytest.skip("lowbit.quant._laq was not built")
    lib = W._laq
    was = lib.simd(-1)
    if request.param == "scalar":
        lib.simd(0)
    elif not was:
        pytest.skip("the CPU has no AVX2: the scalar loops are the only ones")
    yield request.param
    lib.simd(1 if was else 0)


@pytest.fixture
def laq_calls(monkeypatch):
    """The names of the extension's functions called during the test, in order (the real ones run)."""
    calls = []
    real = W._laq

    class Spy:
        def __getattr__(self, name):
            fn = getattr(real, name)
            return lambda *a: (calls.append(name), fn(*a))[1]

    monkeypatch.setattr(W, "_laq", Spy())
    return calls
