"""Chunks: cutting files (FastCDC), encoding chunk objects, storing them by hash.

``_chunking`` cuts byte streams at content-defined boundaries, ``_codec``
frames one chunk (raw, zstd, byte-grouped floats, delta), ``_floatcodec`` and
``_entropy`` are the tensor codecs it calls, ``_store`` puts and gets chunks
by BLAKE3 hash and verifies every read, ``_inplace`` reads one straight into
a caller's buffer (a tensor) and verifies it there, ``_listing`` lists which
chunks a store already holds so a put can skip them.
"""
