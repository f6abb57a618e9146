"""FAMA detector service: failure detectors, policy rules, specialized agents and the Redis worker."""
