"""The ML layer, built on the public ``Store`` only.

``checkpoint`` (a checkpoint manager for training loops), ``query`` (find
versions by metric, tag and metadata), ``lineage`` (ancestors and
descendants), ``prune`` (retention policies), ``diff`` (what changed between
two versions, tensor by tensor), ``plain_storage`` (the familiar
upload/download/list API of the storage layers cas replaces) and
``storage_manager`` (the ``StorageManager`` API of RLHF training stacks).
"""
