"""What the proxy and the detector service share: the versioned wire format, the profile, tool kinds and cached
policy extractions."""
