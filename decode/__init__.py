"""Constrained decoding: masked digit scoring for multiple choice, capped generation for short answers."""
