"""FAMA proxy: the OpenAI-compatible edge that supervises tool-using agents."""
