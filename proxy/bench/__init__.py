"""``fama bench``: the proxy's overhead against the direct call, measured in the same run."""
