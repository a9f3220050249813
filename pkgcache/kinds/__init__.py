"""Per-ecosystem knowledge: what a mirror of each kind knows of its files."""

#: Where, within a mirror's tree, the files of its ``files`` hosts are served.
FILES_PREFIX = "files"


def link_bases(sources) -> tuple[str, ...]:
    """Each source's URL ending in ``/``: a link below one is a link to it."""
    return tuple(s.text if s.text.endswith("/") else s.text + "/" for s in sources)
