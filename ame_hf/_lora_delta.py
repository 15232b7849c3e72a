"""A LoRA delta as peft merges it, computed for any block of rows with bytes that do not depend on the block."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Lora:
    a: torch.Tensor          # [r, in] (Linear), [r, num_embeddings] (Embedding), [r, in * kernel] (ConvNd)
    b: torch.Tensor          # [out, r] (Linear, ConvNd) or [dim, r] (Embedding)
    scaling: float
    rows_from_a: bool        # rows of W index A's columns (embedding, fan_in_fan_out), else B's rows
    shape: tuple[int, ...] = ()  # W's shape after its first dimension (a ConvNd delta is reshaped to it)
    bias: torch.Tensor | None = None
    experts: bool = False    # W is [experts, d1, d2], its rows experts: `a` [experts, r, in], `b` [experts, out, r]


def lora_delta(lora: Lora, rows: tuple[int, int] | None) -> torch.Tensor:
    """The rows `[start, stop)` of `scaling * (B @ A)` (transposed where PEFT transposes it, reshaped to a
    convolution's kernel; for fused experts, one such matrix per expert row).

    Summed one rank term at a time, each an element-wise product then an addition, in the same order for every
    element: a value does not depend on which rows its block holds nor on the device (a matrix product rounds
    differently with the shape of the block, so the bytes of a merge depended on the block size).
    """
    if lora.bias is not None:
        bias = lora.bias.float()
        return (bias if rows is None else bias[rows[0]:rows[1]]) * lora.scaling
    if lora.experts:
        start, stop = rows or (0, lora.a.shape[0])
        return torch.stack([_matrix(lora.a[e], lora.b[e], lora.rows_from_a, None, lora.scaling)
                            for e in range(start, stop)])
    out = _matrix(lora.a, lora.b, lora.rows_from_a, rows, lora.scaling)
    return out.reshape(out.shape[0], *lora.shape) if len(lora.shape) > 1 else out


def _matrix(a: torch.Tensor, b: torch.Tensor, rows_from_a: bool, rows: tuple[int, int] | None,
            scaling: float) -> torch.Tensor:
    a, b = a.float(), b.float()
    if rows_from_a:  # W = (B @ A).T: its rows are A's columns
        left, right = (a if rows is None else a[:, rows[0]:rows[1]]).T, b.T
    else:
        left, right = (b if rows is None else b[rows[0]:rows[1]]), a
    out = left[:, :1] * right[:1]
    term = torch.empty_like(out)
    for k in range(1, left.shape[1]):
        torch.mul(left[:, k:k + 1], right[k:k + 1], out=term)
        out += term
    out *= scaling
    return out
