"""Per-ecosystem knowledge: what a package archive's own files say about the rest."""
