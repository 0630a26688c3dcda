"""Attacks: each declares the surface it needs and a metric family that scores it."""
