"""Every Redis access of both services: key and stream names (``keys``), the client factory (``client``), Streams
commands (``streams``), plain values, claims and lists, and the recorded sessions read back (``values``), the
batched writer (``writer``) and the consumer-group loop (``consumer``)."""
