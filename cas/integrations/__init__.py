"""Integrations with the frameworks where checkpoints are born; each module imports its own.

``dcp`` plugs cas into ``torch.distributed.checkpoint``: every rank writes
its shards straight into a store, and one version is committed.
"""
