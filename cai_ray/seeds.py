"""Seeds derived from names: the same in the driver and in every actor (no process-salted ``hash``)."""

from __future__ import annotations

import zlib


def stable_seed(*parts: object) -> int:
    """A seed from ``parts`` that is the same in every process (Python's ``hash`` is salted per process)."""
    return zlib.crc32(":".join(str(p) for p in parts).encode("utf-8"))
