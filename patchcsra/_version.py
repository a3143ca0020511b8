"""The version of patchcsra (a leaf module: nothing here imports the package)."""
__version__ = "0.1.0"
