"""fsspec helpers, atomic writes, part stores, source listing and safe tar streaming for curation runs."""
