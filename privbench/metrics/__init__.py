"""Metrics by family: paired reconstruction (image.py), later perceptual, membership and cost."""
