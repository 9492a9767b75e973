"""cas: a content-addressable artifact store for machine learning."""

__version__ = "0.1.0"
