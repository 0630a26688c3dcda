"""Defenses: transformations of the training pipeline and of what it lets out."""
