"""Pseudo-words: `pseudo_words` (placeholder tokens, initial vectors, splicing learned rows
into the token table), the embedding files: `embedding_io` (the `Concept` record, every
format read), `embedding_writer` (the formats written, atomically), `file_names` (a
diffusers pair's files, the name that registers a token in each tool, the usage line), and
`exporter`.
"""
