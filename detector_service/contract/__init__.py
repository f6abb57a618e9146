"""What the proxy and the detector service share: the versioned wire format, the profile, tool kinds, cached
policy extractions and how agents write actions as text (the dialects)."""
