"""The release version, in a module of its own so that the console and the command line read
it without importing the package root (which names, lazily, every layer above them)."""

__version__ = "0.2.0"
