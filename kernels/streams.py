"""Deterministic random streams keyed by (seed, cycle, member, purpose).

Every random draw that belongs to one ensemble member comes from its own generator, seeded from
a hash of its key. Results then do not depend on how members are spread over ranks or batches,
and a resumed run repeats an uninterrupted one bit for bit without checkpointing any RNG state.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable

import torch

Key = int | str


def stream_seed(seed: int, *keys: Key) -> int:
    """A 63-bit seed derived from ``(seed, *keys)``; stable across processes and platforms."""
    text = "\x1f".join(str(k) for k in (seed, *keys)).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") >> 1


def generator(seed: int, *keys: Key, device: torch.device | str = "cpu") -> torch.Generator:
    """A fresh ``torch.Generator`` for the stream ``(seed, *keys)``."""
    g = torch.Generator(device=device)
    g.manual_seed(stream_seed(seed, *keys))
    return g


def per_member(
    draw: Callable[[torch.Generator], torch.Tensor],
    seed: int,
    members: Iterable[int],
    *keys: Key,
) -> torch.Tensor:
    """Stack ``draw(generator(seed, *keys, i))`` over member indices ``i``.

    ``draw`` returns one member's sample (any shape); the result is ``(len(members), *shape)``.
    Drawing member by member is what makes a member's numbers independent of its batch; the
    loop only seeds generators and is negligible next to the model steps that follow.
    """
    return torch.stack([draw(generator(seed, *keys, int(i))) for i in members])
