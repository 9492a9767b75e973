"""Tensor-aware storage of safetensors files.

``_safetensors`` parses a file's header and plans its chunks on tensor
boundaries; ``_writer`` stores those chunks byte-grouped, or as deltas of
the same tensor in a former version.
"""
