"""The put and restore pipelines.

``_ingest`` scans a file or folder, chunks and uploads it in parallel and
builds the manifest's entries; ``_restore`` fetches, verifies and writes a
version back beside its destination; ``_budget`` bounds the bytes in flight
between their stages so memory stays flat as files grow.
"""
