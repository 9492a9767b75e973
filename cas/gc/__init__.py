"""What is live and what is not: garbage collection and integrity checks.

``_session`` is a writer's side of the lock-free GC protocol (its marker,
the refreshing of reused chunks, the checks around its commit), ``_lease``
how markers show that their put or collection is alive, ``_settings`` the
grace and lease a store's writers and collections share, ``_collect`` the
mark and sweep itself, ``_digestset`` the compact set of live chunk hashes
it marks into, ``_verify`` the integrity check of every live version, and
``_usage`` what deleting versions frees. All of them walk what is live as
the repository layer defines it (``cas.repository._live``), as ``cas
stats`` does (``cas.store._stats``). See docs/gc.md.
"""
