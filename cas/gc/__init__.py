"""What is live and what is not: garbage collection and integrity checks.

``_session`` is a writer's side of the lock-free GC protocol (its marker,
the refreshing of reused chunks), ``_collect`` the mark and sweep itself,
``_digestset`` the compact set of live chunk hashes it marks into, and
``_verify`` the integrity check of every live version. See docs/gc.md.
"""
