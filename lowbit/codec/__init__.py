"""Tensors <-> bytes: bit packing, the versioned frame, and codecs built on lowbit.quant."""
from lowbit.codec.codecs import QSGDCodec, RawCodec, StochasticGradCodec, TernGradCodec, WeightCodec, frame_from_qtensor, grad_codec, weight_codec
from lowbit.codec.decode import decode_frame, decode_sum, qtensor_from_frame
from lowbit.codec.threads import get_codec_threads, set_codec_threads
from lowbit.codec.entropy import EntropyCodec
from lowbit.codec.feedback import FeedbackCodec, with_feedback
from lowbit.codec.native import native_codec_available, native_codec_enabled, set_native_codec
from lowbit.codec.frame import Frame, frame_nbytes, join_frames, split_frames
from lowbit.codec.pack import pack_bits, packed_nbytes, unpack_bits

__all__ = [
    "Frame", "frame_nbytes", "join_frames", "split_frames", "pack_bits", "unpack_bits", "packed_nbytes",
    "RawCodec", "StochasticGradCodec", "QSGDCodec", "TernGradCodec", "WeightCodec", "grad_codec",
    "weight_codec", "decode_frame", "decode_sum", "frame_from_qtensor", "qtensor_from_frame", "set_codec_threads",
    "get_codec_threads", "set_native_codec", "native_codec_available",
    "native_codec_enabled", "FeedbackCodec", "with_feedback", "EntropyCodec",
]
