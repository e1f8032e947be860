"""Frames back to tensors: :func:`decode_frame` (one frame, into a fresh or a warm tensor),
:func:`decode_sum` (the frames of one tensor decoded, summed and averaged in one pass, the owners'
op) and the pieces they run on: value tables per grid and width, chunked torch decoding, the
compiled loop (:mod:`lowbit.codec.native`) and the codec thread pool that splits large decodes.
Every code read from a peer's payload is checked against its grid here."""
from __future__ import annotations

import functools
import math

import torch

from lowbit.codec import native
from lowbit.codec.entropy import expand
from lowbit.codec.frame import Frame
from lowbit.codec.pack import unpack_bits, unpack_small, unpack_words_into
from lowbit.codec.sparse import densify
from lowbit.codec.threads import get_codec_threads, pool, run_spans
from lowbit.errors import ConfigError, FrameError
from lowbit.quant.qtensor import QTensor, grid_k, levels

# CPU decode chunk: CHUNK_BYTES payload bytes for b in {1, 2, 4, 8} (2-bit: 512K values), 4·CHUNK_BYTES
# values for the other widths: large enough to amortise the ~15 Python-level torch calls a chunk
# costs; larger chunks gain little more (measurements: docs/benchmarks.md).
CHUNK_BYTES = 1 << 17

def qtensor_from_frame(f: Frame, device: torch.device | str | None = None) -> QTensor:
    if f.encoding == "raw":
        raise FrameError("raw frame holds no quantized codes")
    payload = f.payload if device is None else f.payload.to(device)
    codes = unpack_bits(payload, f.bits, math.prod(f.shape)).reshape(f.shape)
    # One scale is per tensor (a (1, n) tensor with one row decodes identically either way).
    scale = f.scales.reshape(()) if f.scales.numel() == 1 else f.scales
    if device is not None:
        scale = scale.to(device)
    if f.encoding == "sym":
        k = (1 << (f.bits - 1)) - 1
        if codes.numel() and int(codes.max()) > 2 * k:
            raise FrameError(f"code {int(codes.max())} outside the {f.bits}-bit symmetric grid (max {2 * k})")
    elif f.encoding == "log":
        k = (1 << (f.bits - 1)) - 1
        if codes.numel() and int(codes.max()) > 2 * k:
            raise FrameError(f"code {int(codes.max())} outside the {f.bits}-bit log grid (max {2 * k})")
    return QTensor(codes=codes, scale=scale, bits=f.bits, grid=f.encoding)


def dense_frame(f: Frame) -> Frame:
    """A row-sparse or entropy-coded gradient frame as the dense frame it was made from (exactly);
    any other frame as it is."""
    if f.kind == "gsparse":
        return densify(f)
    if f.kind == "gcoded":
        return expand(f)
    return f


def decode_frame(f: Frame, device: torch.device | str | None = None, *, out: torch.Tensor | None = None,
                 accumulate: bool = False) -> torch.Tensor:
    """Any frame back to a float tensor of its declared dtype.

    Grid frames are dequantized straight from the packed bytes (bit-identical to
    ``qtensor_from_frame(f).dequantize(f.dtype)``): for b ∈ {1, 2, 4, 8} a 256-entry table maps
    each payload byte to its 8/b output values (levels[code]·scale, cast to the dtype) and one
    ``index_select`` per chunk writes them; for b = 3 each group of 8 codes (3 bytes) is read as
    one 24-bit word whose two 12-bit halves index a 4096-entry table of 4 values each; for
    b ∈ {5, 6, 7} the codes are unpacked per chunk and looked up in the 2^b-entry table. Codes
    outside the grid raise FrameError. An fp32 CPU decode with one scale per tensor runs
    the compiled loop of :mod:`lowbit.codec.native` when it was built (:func:`decode_sum` with one
    frame: the grid's values times the scale in fp32, for 1-4 bits by AVX2 where the CPU has it),
    with the same bits.

    ``out``: a contiguous floating tensor of the frame's element count to decode into (for example
    a parameter's storage, or a buffer reused every step: a fresh 90 MB tensor costs more in page
    faults than the decode itself). With ``accumulate=True`` the values are added to ``out``
    instead, one cache-sized chunk at a time (a gradient sum without a full-size temporary).
    Returns ``out`` viewed with the frame's shape.
    """
    if f.kind == "wdelta":
        raise FrameError(f"a weight delta (key {f.key}) decodes only onto held codes: lowbit.codec.delta.DeltaDecoder")
    f = dense_frame(f)
    if out is None:
        if accumulate:
            raise ConfigError("accumulate=True needs an out tensor to add into")
    else:
        n = math.prod(f.shape)
        if not out.is_floating_point() or not out.is_contiguous() or out.numel() != n:
            raise ConfigError(f"decode out= must be a contiguous floating tensor of {n} elements (frame shape "
                              f"{tuple(f.shape)}), got {out.dtype} {tuple(out.shape)}"
                              f"{'' if out.is_contiguous() else ' (not contiguous)'}")
        if device is not None and out.device != torch.device(device):
            raise ConfigError(f"decode out= lives on {out.device}, asked for {device}")
    if f.encoding == "raw":
        payload = f.payload if device is None and out is None else f.payload.to(out.device if out is not None else device)
        vals = payload.view(f.dtype).reshape(f.shape)
        if out is None:
            return vals.clone()
        o = out.view(f.shape)
        return o.add_(vals) if accumulate else o.copy_(vals)
    return _dequantize_payload(f, device if out is None else out.device, out, accumulate)


_WIDE = {2: torch.int16, 4: torch.int32, 8: torch.int64, 16: torch.complex128}


def _grid_error(f: Frame, code: int) -> FrameError:
    k = grid_k(f.bits)
    name = "symmetric" if f.encoding == "sym" else "log"
    return FrameError(f"code {code} outside the {f.bits}-bit {name} grid (max {2 * k})")


def _has_all_ones_code(pb: torch.Tensor, bits: int) -> bool:
    """Whether any b-bit field (b = 2, 4, 8) of the byte chunk ``pb`` is all ones (code 2^b − 1)."""
    if bits == 8:
        return bool(pb.numel()) and int(pb.max()) == 255
    if pb.numel() % 8:
        pad = pb.new_zeros(pb.numel() + (-pb.numel()) % 8)
        pad[: pb.numel()] = pb
        pb = pad
    x = pb.view(torch.int64)
    t = x & (x >> 1)
    if bits == 4:
        t &= t >> 2
    return bool((t & (0x5555555555555555 if bits == 2 else 0x1111111111111111)).any())


@functools.lru_cache(maxsize=64)
def _code_values(encoding: str, bits: int, width: int, device: str) -> torch.Tensor:
    """(2^width, width // bits) float32, built once per grid: entry i holds the unscaled grid values
    of the ``width // bits`` codes packed in i (code j at bits [b·j, b·j + b)); a code past the grid
    (the all-ones code of a symmetric or log grid) reads 0. A decode then scales this table with one
    multiply instead of rebuilding it: for the many small frames of a model (LayerNorm weights,
    biases) building it dominated the decode."""
    lv = levels(encoding, bits, device)
    table = torch.zeros(1 << bits, dtype=torch.float32, device=device)
    table[: lv.numel()] = lv
    i = torch.arange(1 << width, device=device)
    shifts = torch.arange(0, width, bits, device=device)[: width // bits]
    return table[(i.unsqueeze(1) >> shifts) & ((1 << bits) - 1)].contiguous()


def _value_table(f: Frame, width: int, scale: torch.Tensor | None, dtype: torch.dtype, device: torch.device,
                 wide: bool = True) -> tuple[torch.Tensor, torch.dtype | None, int]:
    """The frame's values for ``width``-bit indices holding ``width // bits`` codes each: the cached
    grid table times ``scale`` (fp32, as the reference dequantization multiplies), cast to ``dtype``
    and stored as one wide element (int16 .. complex128) per index so one ``index_select`` writes
    all its values; past 16 bytes an entry is ``rows`` complex128 elements. Returns (table, wide
    dtype, rows); with ``wide=False`` (width == bits) a plain 1-D table of ``dtype``, None, 1."""
    t = _code_values(f.encoding, f.bits, width, str(device))
    if scale is not None:
        t = t * scale
    t = t.to(dtype)
    if not wide:
        return t.view(-1), None, 1
    nbytes = t.shape[1] * t.element_size()
    wdt = _WIDE.get(nbytes, torch.complex128)
    rows = 1 if nbytes in _WIDE else nbytes // 16
    t = t.view(wdt)
    return (t.reshape(1 << width, rows) if rows > 1 else t.reshape(1 << width)), wdt, rows


def _words24(groups: torch.Tensor, word: torch.Tensor, tmp: torch.Tensor) -> torch.Tensor:
    """``groups`` (m, 3) uint8, the packed bytes of m groups of 8 three-bit codes, as m little-endian
    24-bit words in the int32 ``word`` (three casts, two shifts, two ors; ``tmp`` is scratch)."""
    word.copy_(groups[:, 2])
    word.bitwise_left_shift_(8)
    tmp.copy_(groups[:, 1])
    word.bitwise_or_(tmp).bitwise_left_shift_(8)
    tmp.copy_(groups[:, 0])
    return word.bitwise_or_(tmp)


_CODE7 = sum(1 << s for s in range(0, 24, 3))  # the low bit of each 3-bit field of a 24-bit word


def _has_code7(word: torch.Tensor, tmp: torch.Tensor) -> bool:
    """Whether any 3-bit field of the 24-bit words is 7 (all ones), the one code outside a 3-bit
    symmetric or log grid."""
    torch.bitwise_right_shift(word, 1, out=tmp)
    tmp.bitwise_and_(word).bitwise_and_(word >> 2).bitwise_and_(_CODE7)
    return bool(tmp.any())


# Frames of at most this many values (a model's LayerNorm weights and biases: most of its frames)
# decode in a handful of whole-frame ops: the chunked table paths cost ~20 torch calls per frame.
SMALL_FRAME = 4096


def _lookup_small(f: Frame, pb: torch.Tensor, n: int, table: torch.Tensor, check: bool) -> torch.Tensor:
    """Values of the first ``n`` codes of ``pb`` from the 2^b-entry ``table``; a code outside the
    grid (all ones) raises FrameError."""
    codes = unpack_small(pb, f.bits, n)
    if check and n and int(codes.max()) == (1 << f.bits) - 1:
        raise _grid_error(f, (1 << f.bits) - 1)
    return torch.index_select(table, 0, codes)


_NATIVE_BITS = (1, 2, 3, 4, 8)
_NATIVE_PART = 1 << 18  # values per thread when a decode is split across codec threads


@functools.lru_cache(maxsize=16)
def _bad_entries(bits: int, width: int) -> torch.Tensor:
    """uint8 (2^width,): 1 where the ``width // bits`` codes packed in the index include the
    all-ones code (outside a symmetric or log grid)."""
    i = torch.arange(1 << width)
    shifts = torch.arange(0, width, bits)[: width // bits]
    m = (1 << bits) - 1
    return (((i.unsqueeze(1) >> shifts) & m) == m).any(1).to(torch.uint8).contiguous()


def _scale_ptr(f: Frame, keep: list) -> int:
    """Address of the frame's one fp32 scale (a parsed frame's own buffer; anything else is copied
    into ``keep``, which the caller holds while the compiled loop runs)."""
    sc = f.scales
    if sc.dtype != torch.float32 or sc.device.type != "cpu" or not sc.is_contiguous():
        sc = sc.to("cpu", torch.float32).contiguous()
        keep.append(sc)
    return sc.data_ptr()


def _native_fits(f: Frame, out_dtype: torch.dtype, out_device: torch.device) -> bool:
    """Whether the compiled loop decodes ``f`` into a destination of ``out_dtype`` on ``out_device``:
    fp32 on the CPU, a b-bit grid (b = 1, 2, 3, 4, 8) with one scale, the payload contiguous uint8
    bytes on the CPU."""
    p = f.payload
    return (native.native_codec_enabled() and f.encoding != "raw" and f.bits in _NATIVE_BITS
            and out_dtype == torch.float32 and out_device.type == "cpu" and f.scales.numel() == 1
            and p.dtype == torch.uint8 and p.device.type == "cpu" and p.is_contiguous())


def _native_sum(frames, out: torch.Tensor, divisor: int, accumulate: bool) -> None:
    """``out`` (fp32, contiguous, one value per element) = (Σ_i decode(frames[i])) / divisor, or
    ``out`` + Σ with ``accumulate``, in one pass of the compiled loop (``_native.decode_sum``): the
    unscaled grid tables are cached per grid and multiplied by each frame's scale in C, the same fp32
    products as the torch path's ``table * scale``, and the sum is taken in frame order with one
    division at the end, so the bits are those of decoding, adding and ``div_`` one after another. A
    large tensor is cut into parts of whole 8-code groups, one per codec thread (the loop releases
    the GIL). A code outside the grid raises FrameError with ``index``, the first such frame."""
    f0 = frames[0]
    bits, enc, n = f0.bits, f0.encoding, out.numel()
    if n == 0:
        return
    for f in frames[1:]:
        if f.bits != bits or f.encoding != enc:
            raise ConfigError(f"decode_sum: frames of one tensor must share their grid, got {enc} {bits}-bit "
                              f"and {f.encoding} {f.bits}-bit")
    width = 12 if bits == 3 else 8
    # The tables are held in locals while the loop runs: lru_cache does not store the result of a
    # call that raced another thread to the same key, so a bare ``_code_values(...).data_ptr()`` can
    # point into a tensor freed right after it (a real hazard under Ray's threaded actors).
    # A small 3-bit frame goes code by code: scaling the 4096-entry table would cost more.
    tab = None if bits == 3 and n <= SMALL_FRAME else _code_values(enc, bits, width, "cpu")
    one = _code_values(enc, bits, bits, "cpu")
    bad_tab = _bad_entries(bits, width) if enc in ("sym", "log") else None
    tp, onep = (0 if tab is None else tab.data_ptr()), one.data_ptr()
    bp = 0 if bad_tab is None else bad_tab.data_ptr()
    keep: list = [tab, one, bad_tab]
    streams = tuple((f.payload.data_ptr(), f.payload.numel(), _scale_ptr(f, keep)) for f in frames)
    op = out.data_ptr()

    def part(a: int, e: int) -> int:  # a: a multiple of 8, so the part starts on a byte
        return native.lib.decode_sum(op, a, e, n, bits, tp, onep, bp, streams, divisor, accumulate)

    threads = min(get_codec_threads(), n // _NATIVE_PART)
    if threads <= 1:
        bad = part(0, n)
    else:
        cuts = [i * n // threads // 8 * 8 for i in range(threads)] + [n]
        bad = min((b for b in pool(get_codec_threads()).map(part, cuts[:-1], cuts[1:]) if b), default=0)
    if bad:
        err = _grid_error(frames[bad - 1], (1 << bits) - 1)
        err.index = bad - 1
        raise err


def decode_sum(frames, out: torch.Tensor, *, divisor: int = 1, accumulate: bool = False) -> torch.Tensor:
    """S frames of one tensor (a gradient from S workers) decoded and summed into ``out``:

        out = (decode(frames[0]) + ... + decode(frames[S-1])) / divisor     (accumulate: out + Σ ...)

    with the bits of :func:`decode_frame` into ``out``, ``accumulate=True`` for the others, then
    ``out.div_(divisor)``. Where the compiled loop applies (fp32 CPU, one scale per frame) this is
    one pass that writes ``out`` once, instead of S + 1 passes over it. ``out``: a contiguous
    floating tensor of the frames' element count. A frame whose codes leave its grid raises
    FrameError with ``index`` = its position in ``frames``."""
    frames = list(frames)
    if not frames:
        raise ConfigError("decode_sum needs at least one frame")
    if isinstance(divisor, bool) or not isinstance(divisor, int) or divisor < 1:
        raise ConfigError(f"decode_sum divisor must be an integer >= 1, got {divisor!r}")
    n = math.prod(frames[0].shape)
    for i, f in enumerate(frames):
        if tuple(f.shape) != tuple(frames[0].shape):
            raise ConfigError(f"decode_sum: frame {i} has shape {tuple(f.shape)}, frame 0 {tuple(frames[0].shape)}")
    if not out.is_floating_point() or not out.is_contiguous() or out.numel() != n:
        raise ConfigError(f"decode_sum out= must be a contiguous floating tensor of {n} elements (frame shape "
                          f"{tuple(frames[0].shape)}), got {out.dtype} {tuple(out.shape)}")
    flat = out.view(-1)
    if all(_native_fits(f, flat.dtype, flat.device) for f in frames):
        _native_sum(frames, flat, divisor, accumulate)
        return out
    for i, f in enumerate(frames):
        try:
            decode_frame(f, out=flat, accumulate=accumulate or i > 0)
        except FrameError as e:
            e.index = i
            raise
    if divisor > 1:
        flat.div_(divisor)
    return out


def _dequantize_payload(f: Frame, device, dest: torch.Tensor | None = None, accumulate: bool = False
                        ) -> torch.Tensor:
    payload = f.payload if device is None else f.payload.to(device)
    dev = payload.device
    bits, numel = f.bits, math.prod(f.shape)
    per_row = f.scales.numel() != 1
    if payload is f.payload and _native_fits(f, f.dtype if dest is None else dest.dtype, dev):
        # the common case (a received frame into a kept buffer): the compiled loop, no torch ops
        out = torch.empty(numel, dtype=torch.float32) if dest is None else dest.view(-1)
        _native_sum((f,), out, 1, accumulate)
        return out.view(f.shape)
    if per_row and dest is not None:  # per-row scales multiply whole rows afterwards: via a temporary
        t = _dequantize_payload(f, dev)
        o = dest.view(f.shape)
        return o.add_(t) if accumulate else o.copy_(t)
    scales = f.scales.to(dev, torch.float32)
    scale = None if per_row else scales.reshape(())
    out_dtype = torch.float32 if per_row else (f.dtype if dest is None else dest.dtype)
    check = f.encoding in ("sym", "log")  # the one invalid code is 2k+1 = 2^b − 1
    if numel <= SMALL_FRAME or 8 % bits and bits != 3:
        table = _value_table(f, bits, scale, out_dtype, dev, wide=False)[0]
    else:
        table = None  # the chunked paths build wide tables
    if numel <= SMALL_FRAME:
        vals = _lookup_small(f, payload, numel, table, check)
        if dest is None:
            return _finish_rows(vals, f, scales, per_row)
        out = dest.view(-1)
        out.add_(vals) if accumulate else out.copy_(vals)
        return out.view(f.shape)
    step = CHUNK_BYTES if dev.type == "cpu" else 1 << 62
    out = torch.empty(numel, dtype=out_dtype, device=dev) if dest is None else dest.view(-1)
    # Every chunk is decoded into ``target(a, e)``: out[a:e] itself, or a cache-sized scratch that
    # ``land(a, e, t)`` then adds (accumulate) or copies to out[a:e]. The byte-table path writes
    # 8/b values at once as one wide element (up to 16 bytes), which needs a destination aligned to
    # that width: a tensor mapped from a file (a model loaded from safetensors) may be aligned to
    # 8 bytes only, and a misaligned wide write faults (SIGSEGV), so such a destination gets the scratch.
    per = 8 // bits if 8 % bits == 0 else (4 if bits == 3 else 1)  # values written per table entry
    misaligned = (dest is not None and per > 1
                  and dest.data_ptr() % min(16, per * dest.element_size()) != 0)
    use_scratch = accumulate or misaligned

    def decoder():
        """A chunk decoder with its own buffers (one per thread): ``run(a, e, pb)`` writes the values
        a..e from their payload bytes ``pb`` into out[a:e] (or adds them)."""
        scratch = torch.empty(buf_n, dtype=out_dtype, device=dev) if use_scratch else None
        idx = torch.empty(idx_n, dtype=torch.int32, device=dev)

        def target(a: int, e: int) -> torch.Tensor:
            return scratch[: e - a] if use_scratch else out[a:e]

        def land(a: int, e: int, t: torch.Tensor) -> None:
            if accumulate:
                out[a:e].add_(t)
            elif use_scratch:
                out[a:e].copy_(t)

        if 8 % bits == 0:
            def run(a: int, e: int, pb: torch.Tensor) -> None:  # a, e multiples of 8/b
                if check and _has_all_ones_code(pb, bits):
                    raise _grid_error(f, (1 << bits) - 1)
                m = pb.numel()
                ic = idx[:m]
                ic.copy_(pb)
                t = target(a, e)
                tw = t.view(wide).reshape(m, rows) if rows > 1 else t.view(wide)
                torch.index_select(btab, 0, ic, out=tw)
                land(a, e, t)
        elif bits == 3:
            word = torch.empty(idx_n // 2, dtype=torch.int32, device=dev)
            tmp = torch.empty(idx_n // 2, dtype=torch.int32, device=dev)

            def run(a: int, e: int, pb: torch.Tensor) -> None:  # a, e multiples of 8
                m = (e - a) // 8
                w, tm = _words24(pb.view(m, 3), word[:m], tmp[:m]), tmp[:m]
                if check and _has_code7(w, tm):
                    raise _grid_error(f, 7)
                iv = idx[: 2 * m].view(m, 2)
                torch.bitwise_and(w, 0xFFF, out=tm)
                iv[:, 0].copy_(tm)  # a contiguous result copied into the strided column beats a strided out=
                torch.bitwise_right_shift(w, 12, out=tm)
                iv[:, 1].copy_(tm)
                t = target(a, e)
                tw = t.view(wide).reshape(2 * m, rows) if rows > 1 else t.view(wide)
                torch.index_select(ftab, 0, idx[: 2 * m], out=tw)
                land(a, e, t)
        else:
            codes = torch.empty(idx_n, dtype=torch.uint8, device=dev)

            def run(a: int, e: int, pb: torch.Tensor) -> None:  # a, e multiples of 8
                cc = codes[: e - a]
                unpack_words_into(pb, bits, cc)
                if check and int(cc.max()) == (1 << bits) - 1:
                    raise _grid_error(f, (1 << bits) - 1)
                ic = idx[: e - a]
                ic.copy_(cc)
                t = target(a, e)
                torch.index_select(table, 0, ic, out=t)
                land(a, e, t)
        return run

    if 8 % bits == 0:
        btab, wide, rows = _value_table(f, 8, scale, out_dtype, dev)
        whole = numel // per  # payload bytes whose values all belong to the tensor
        spans = [(a * per, min(a + step, whole) * per, payload[a:min(a + step, whole)]) for a in range(0, whole, step)]
        idx_n, buf_n = min(step, whole) or 1, min(step, whole) * per or 1
        tail = (whole * per, numel) if whole * per < numel else None
    else:
        cstep = min(4 * step, numel - numel % 8) or 8
        full = numel - numel % 8
        spans = [(a, min(a + cstep, full), payload[a * bits // 8: min(a + cstep, full) * bits // 8])
                 for a in range(0, full, cstep)]
        idx_n = buf_n = cstep
        if bits == 3:  # 12-bit fields, 4 values each
            ftab, wide, rows = _value_table(f, 12, scale, out_dtype, dev)
            idx_n = cstep // 4
        tail = (full, numel) if full < numel else None
    run_spans(decoder, spans, dev)
    if tail is not None:  # the last values share a byte (or a group of 8 codes) with padding
        a, e = tail
        if table is None:
            table = _value_table(f, bits, scale, out_dtype, dev, wide=False)[0]
        last = _lookup_small(f, payload[a * bits // 8:], e - a, table, check)
        if accumulate:
            out[a:e].add_(last)
        else:
            out[a:e].copy_(last)
    return _finish_rows(out, f, scales, per_row)


def _finish_rows(out: torch.Tensor, f: Frame, scales: torch.Tensor, per_row: bool) -> torch.Tensor:
    """Per-row frames decode unscaled in fp32: multiply each row by its scale, cast to the frame's dtype."""
    if per_row:
        out.view(scales.numel(), -1).mul_(scales.unsqueeze(1))
        out = out.to(f.dtype)
    return out.reshape(f.shape)
