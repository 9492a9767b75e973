"""The repository layer: what a store is made of, above the bytes of a backend.

``_layout`` is the key schema (where chunks, manifests, refs and GC state
live), ``_manifest`` the canonical manifest of one version and the chunks it
keeps alive, ``_refs`` the version and tag refs of a key, ``_live`` the one
walk over every live version, ``_metadata`` the typed metadata a version
carries (type, job, metrics...) and the summary a ref keeps of it. Nothing
here knows how chunks are cut or encoded.
"""
