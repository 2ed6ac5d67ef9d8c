"""The version of durable, apart from the package so any module can read it without importing the package."""

__version__ = "0.1.0"
