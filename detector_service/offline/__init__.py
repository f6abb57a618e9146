"""Offline work on recorded trajectories: ``fama replay``, ``fama analyze`` (stage 1) and their scoring."""
