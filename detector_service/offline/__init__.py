"""Offline work on recorded trajectories: ``fama replay``, ``fama analyze`` (stage 1) and their scoring, recorded
sessions exported as trajectory records (``fama sessions export``) and the shadow report (``fama report``)."""
