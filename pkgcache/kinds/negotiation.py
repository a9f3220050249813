"""
Reading a client's ``Accept`` header, for documents a registry serves in
more than one form (PyPI's HTML and JSON pages, npm's full and abbreviated
package documents), each cached apart.
"""

from __future__ import annotations


def media_type_qualities(accept: bytes) -> dict[bytes, float]:
    """
    Each media type ``accept`` names (lower-cased, parameters dropped) with
    its ``q`` value: 1 if not given, 0 if not a number, the highest when a
    type is named twice.
    """
    qualities: dict[bytes, float] = {}
    for item in accept.split(b","):
        media_type, *parameters = (part.strip() for part in item.split(b";"))
        q = 1.0
        for parameter in parameters:
            name, _, value = parameter.partition(b"=")
            if name.strip().lower() == b"q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        media_type = media_type.lower()
        if media_type:
            qualities[media_type] = max(q, qualities.get(media_type, 0.0))
    return qualities
