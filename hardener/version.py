"""harden's version: a leaf module, so that modules writing it into files do not import the package's facade."""
__version__ = "0.1.0"
