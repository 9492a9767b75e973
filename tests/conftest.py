"""Shared pytest configuration. Fixture modules are registered as plugins below."""

pytest_plugins = ["backend_fixtures", "ui_fixtures"]
