"""Redis: every key and stream name (``keys``) and every Streams command (``streams``)."""
