"""Integrations with the frameworks where checkpoints are born; each module imports its own."""
