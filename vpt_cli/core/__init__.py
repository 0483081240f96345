"""Errors, atomic file I/O and safe text: what every layer may use."""
