"""Finetuning stages."""
