"""The backend conformance suite on every backend, cloud ones against local servers."""

from __future__ import annotations

import pytest

from cas.backends import Backend
from cas.testing.conformance import BackendConformance


class TestMemoryBackend(BackendConformance):
    @pytest.fixture
    def backend(self, memory_backend: Backend) -> Backend:
        return memory_backend


class TestLocalBackend(BackendConformance):
    @pytest.fixture
    def backend(self, local_backend: Backend) -> Backend:
        return local_backend


class TestS3Backend(BackendConformance):
    mtime_resolution = 1.0  # Last-Modified is an HTTP date: whole seconds

    @pytest.fixture
    def backend(self, s3_backend: Backend) -> Backend:
        return s3_backend
