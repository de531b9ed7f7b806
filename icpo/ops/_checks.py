"""Input checks shared by the op wrappers of :mod:`icpo.ops` (and ``icpo.algorithms``).

Each raises ``TypeError`` (wrong type or dtype) or ``ValueError`` (wrong shape, device or
values) with a one-line message that names the argument and what was expected, prefixed by the
public function being called (``op``) when one is given. The compiled ops check again, for
memory safety only (``csrc/checks.h``).
"""

from __future__ import annotations

import torch

#: The floating dtypes every kernel dispatches on (the compiled ops accept the same four).
FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
#: Dtypes of offset tensors (``cu_seqlens``, ``group_offsets``).
INDEX_DTYPES = (torch.int32, torch.int64)


def _prefix(op: str | None) -> str:
    return f"{op}: " if op else ""


def check_tensor(x: object, name: str, op: str | None = None) -> None:
    """``x`` must be a ``torch.Tensor``."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{_prefix(op)}{name} must be a torch.Tensor, got {type(x).__name__}")


def check_float_tensor(x: object, name: str, op: str | None = None, *, dims: tuple[int, ...] = (1,),
                       shape: str = "1-D [N]") -> None:
    """``x`` must be a tensor of one of :data:`FLOAT_DTYPES` with ``x.dim()`` in ``dims``;
    ``shape`` says what was expected in the message (e.g. ``"[T, V] or [B, L, V]"``)."""
    check_tensor(x, name, op)
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{_prefix(op)}{name} must be float32, float64, float16 or bfloat16, got "
                        f"{x.dtype}")
    if x.dim() not in dims:
        raise ValueError(f"{_prefix(op)}{name} must be {shape}, got shape {tuple(x.shape)}")


def check_index_tensor(x: object, name: str, op: str | None = None, *,
                       device: torch.device | None = None, parts: str = "B",
                       min_numel: int = 1) -> None:
    """``x`` must be an int32/int64 1-D offsets tensor ``[parts + 1]`` with at least
    ``min_numel`` elements, on ``device`` (the data's) unless that is None."""
    check_tensor(x, name, op)
    if x.dtype not in INDEX_DTYPES:
        raise TypeError(f"{_prefix(op)}{name} must be int32 or int64, got {x.dtype}")
    if x.dim() != 1 or x.numel() < min_numel:
        raise ValueError(f"{_prefix(op)}{name} must be 1-D with {parts} + 1 >= {min_numel} "
                         f"elements, got shape {tuple(x.shape)}")
    if device is not None and x.device != device:
        raise ValueError(f"{_prefix(op)}{name} must be on {device} (the data's device), got "
                         f"{x.device}")


def check_offsets(offsets: torch.Tensor, total: int, *, op: str | None, name: str, part: str,
                  total_name: str, allow_empty: bool = False) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``offsets`` is a valid cu_seqlens-style tensor.

    offsets: int ``[K + 1]`` (dtype, rank and device already checked, e.g. by
    :func:`check_index_tensor`); must start at 0, be non-decreasing, end at ``total``, and
    (unless ``allow_empty``) hold no empty ``part``. One fused reduction and one host sync on
    the happy path; the error path then finds the offending index. Skipped while
    ``torch.compile`` traces (the checks are data-dependent).
    """
    if torch.compiler.is_compiling():
        return
    if offsets.numel() == 1:
        first = last = int(offsets[0])
        min_step = 1
    else:
        stats = torch.stack((offsets[0], offsets[-1], offsets.diff().min()))
        first, last, min_step = stats.tolist()
    if first == 0 and last == total and min_step >= (0 if allow_empty else 1):
        return
    pre = _prefix(op)
    if first != 0:
        raise ValueError(f"{pre}{name} must start at 0, got {name}[0] = {first}")
    values = offsets.tolist()
    for i, (a, b) in enumerate(zip(values[:-1], values[1:])):
        if b < a:
            raise ValueError(f"{pre}{name} must be non-decreasing, but {name}[{i + 1}] = {b} < "
                             f"{name}[{i}] = {a}")
        if b == a and not allow_empty:
            raise ValueError(f"{pre}{name}[{i}] == {name}[{i + 1}] = {a}: {part} {i} is empty "
                             f"(every {part} needs at least one element)")
    raise ValueError(f"{pre}{name} must end at {total_name} = {total}, got {name}[-1] = {last}")
