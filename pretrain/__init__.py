"""Pretraining stage."""
