"""A source tensor already in jpaged's packed format, as a source yields it to the converter."""

from __future__ import annotations

import dataclasses

import numpy as np

from jpaged.models.packed import PackedFormat, unpack


@dataclasses.dataclass
class PackedTensor:
    """An HF weight [out, in] as packed leaves {qweight, scales, mins} [N, ...], rows = outputs."""

    leaves: dict[str, np.ndarray]
    fmt: PackedFormat
    type_name: str  # the source's name for its format ("Q4_K", "awq", ...), for messages

    @property
    def shape(self) -> tuple[int, int]:
        """The HF weight's [out, in]."""
        return self.leaves["scales"].shape[0], self.leaves["scales"].shape[1] * self.fmt.group_size

    def to_float(self) -> np.ndarray:
        """The float32 weight [out, in], as HF stores a float one."""
        return unpack(self.leaves["qweight"], self.leaves["scales"], self.leaves["mins"], self.fmt, np)
