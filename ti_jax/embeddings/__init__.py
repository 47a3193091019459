"""Pseudo-words: `pseudo_words` (placeholder tokens, initial vectors, splicing learned rows
into the token table), `embedding_io` (every embedding file format) and `exporter`.
"""
