"""
Sizes as people write them (``50G``, ``1.5T``) and as they read them
(``20.0 GiB``): shared by the server's options and ``pkgcache-cull``.
"""

from __future__ import annotations

import re
from decimal import Decimal

_UNITS = "KMGTPE"
_SIZE = re.compile(
    r"(?P<number>[0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*(?:(?P<unit>[kmgtpe])i?)?b?",
    re.IGNORECASE,
)


def parse_size(text: str) -> int:
    """
    Read a size such as ``50G``, ``1.5T``, ``500MiB``, ``10k`` or ``1024``.

    Units are powers of 1024 whether written ``G``, ``GB`` or ``GiB``, in
    any case, as ``df -h`` and ``du -h`` (and nginx's ``max_size``) read
    them: the limit then means what the tools that show disk use show.

    :return: the size in bytes, rounded down.
    :raises ValueError: with a message fit to show the user as it is.
    """
    match = _SIZE.fullmatch(text.strip())
    if match is None:
        raise ValueError(
            f"invalid size {text!r}: expected a number of bytes with an optional "
            f"unit K, M, G, T, P or E (powers of 1024), such as 500M or 1.5T"
        )
    exponent = _UNITS.index(match["unit"].upper()) + 1 if match["unit"] else 0
    # Decimal, not float: 1.1T is an exact number of bytes.
    return int(Decimal(match["number"]) * 1024**exponent)


def format_size(size: int) -> str:
    """
    ``size`` bytes for people: ``512 B``, ``1.5 KiB``, ``20.0 GiB``.
    """
    if size < 1024:
        return f"{size} B"
    value = float(size)
    for unit in _UNITS:
        value /= 1024
        if value < 1024 or unit == _UNITS[-1]:
            break
    return f"{value:.1f} {unit}iB"
