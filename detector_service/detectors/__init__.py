"""Failure detectors, one module per category (DESIGN §3). Each is a pure function over a ``TurnView``."""
