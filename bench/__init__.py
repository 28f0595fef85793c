"""Tollway benchmark: gateway overhead against a fast fake upstream (`python -m bench`)."""
