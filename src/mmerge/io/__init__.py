"""Bytes on disk <-> host arrays: a validating, memory-mapped safetensors reader (fp8 tensors
with scales read as their dequantized values), a streaming, atomic, resumable writer (the profile
is spec/format.md), and PEFT LoRA adapters read, written and applied on read (spec/lora.md; the
math is mmerge.methods.lora's). This package never merges models."""

from mmerge.io.checkpoint import Checkpoint, open_checkpoint
from mmerge.io.dequantize import QuantizedRef
from mmerge.io.dtypes import DTYPES
from mmerge.io.layout import TensorSpec
from mmerge.io.quantization import Quantization
from mmerge.io.tensor_ref import TensorRef
from mmerge.io.writer import StreamingWriter

__all__ = [
    "DTYPES",
    "Checkpoint",
    "QuantizedRef",
    "Quantization",
    "StreamingWriter",
    "TensorRef",
    "TensorSpec",
    "open_checkpoint",
]
