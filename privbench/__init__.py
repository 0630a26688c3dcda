"""privbench: benchmark privacy attacks against privacy defenses on medical images."""

__version__ = "0.3.0"
