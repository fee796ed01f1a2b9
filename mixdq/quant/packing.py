"""Containers for low-bit weight codes, with their exact byte counts.

| bits    | container            | codes per byte |
|---------|----------------------|----------------|
| 5 to 8  | int8                 | 1              |
| 4, 3    | uint8, two nibbles   | 2              |
| 2       | uint8, four crumbs   | 4              |

3-bit codes use the 4-bit container and 5/6/7-bit codes the int8 one: packing
them tighter would save at most 25% on those layers but cost an unaligned
unpack on every forward.  Codes are packed over the flattened weight, padded
to a whole byte, so bytes = ceil(numel / codes_per_byte).
"""
from __future__ import annotations

import math

import torch


def codes_per_byte(bits: int) -> int:
    if bits in (5, 6, 7, 8):
        return 1
    if bits in (3, 4):
        return 2
    if bits == 2:
        return 4
    raise ValueError(f"no packed container for {bits}-bit weights; supported: 2, 3, 4, 5, 6, 7, 8")


def packed_nbytes(numel: int, bits: int) -> int:
    return math.ceil(numel / codes_per_byte(bits))


def pack(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack signed integer codes (int8 tensor, any shape) into a flat byte tensor."""
    per = codes_per_byte(bits)
    flat = q.reshape(-1)
    if per == 1:
        return flat.to(torch.int8).clone()
    width = 8 // per
    offset = 2 ** (width - 1)  # store codes as unsigned: [-2^(w-1), 2^(w-1)-1] -> [0, 2^w - 1]
    u = (flat.to(torch.int16) + offset).to(torch.uint8)
    pad = (-u.numel()) % per
    if pad:
        u = torch.cat([u, u.new_zeros(pad)])
    u = u.view(-1, per)
    out = torch.zeros(u.shape[0], dtype=torch.uint8, device=q.device)
    for i in range(per):
        out |= u[:, i] << (width * i)
    return out


# Unpacking runs on every forward of a 2/3/4-bit layer, so it splits whole bytes
# rather than making one tensor per code: each byte, widened to 16 bits, is OR-ed
# with itself shifted so that its upper field lands in the upper byte, and a mask
# keeps one field per byte (little-endian, as on every host torch runs on: the
# low byte comes first).  4-bit codes take one such split, 2-bit codes two.
# SDXL's 10240x1280 weight, 1 thread: 3.0 ms vs 8.2 ms for shift-mask-stack at 4
# bits (4.4 vs 8.2 ms at 2 bits), next to 17 ms for the int8 GEMM it feeds at 256 tokens.
def _split_bytes(b: torch.Tensor, field: int) -> torch.Tensor:
    """uint8 [n] holding two `field`-bit values per byte -> uint8 [2n], low one first."""
    wide = b.to(torch.int16)
    mask = ((1 << field) - 1) * 0x0101
    return wide.bitwise_or_(wide << (8 - field)).bitwise_and_(mask).view(torch.uint8)


def unpack(packed: torch.Tensor, bits: int, shape) -> torch.Tensor:
    """Inverse of pack: int8 codes with the given shape."""
    per = codes_per_byte(bits)
    numel = math.prod(shape)
    if per == 1:
        return packed.view(torch.int8).reshape(shape)
    width = 8 // per
    codes, field = packed, 8
    while field > width:
        field //= 2
        codes = _split_bytes(codes, field)
    return codes.view(torch.int8)[:numel].sub_(2 ** (width - 1)).reshape(shape)
