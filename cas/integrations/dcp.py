"""PyTorch distributed checkpoints (``torch.distributed.checkpoint``) in a cas store.

Every rank writes its shards straight into the store, deduplicated,
compressed and stored as deltas of the same tensors in the parent checkpoint
or, naming none, the key's latest one; the coordinator commits exactly one
version, or none if any rank fails::

    import torch.distributed.checkpoint as dcp
    from cas.integrations.dcp import CasReader, CasWriter

    dcp.save(state_dict, storage_writer=CasWriter("s3://bucket/prefix", "runs/llm/ckpt",
             metrics={"loss": 1.9}))
    dcp.load(state_dict, storage_reader=CasReader("s3://bucket/prefix", "runs/llm/ckpt@7"))

The version is an ordinary cas version (``cas log``, ``diff``, ``gc``,
``verify`` ...); ``cas get`` restores it as a folder that DCP's own
``FileSystemReader`` loads. docs/distributed.md has the details.
"""

from __future__ import annotations

try:
    import torch.distributed.checkpoint  # noqa: F401 - the framework this module plugs into
except ImportError as err:  # pragma: no cover - torch is in the test environment
    raise ImportError(f"cas.integrations.dcp needs PyTorch: pip install torch ({err})") from err

from ._dcp_reader import CasReader
from ._dcp_writer import CasWriter

__all__ = ["CasReader", "CasWriter"]
