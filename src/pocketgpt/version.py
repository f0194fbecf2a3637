"""The package version, on its own so low-level modules need not import the package's face."""

__version__ = "0.1.0"
