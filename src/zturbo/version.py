"""The package version (one owner, so modules read it without importing the package root)."""

__version__ = "0.1.0"
