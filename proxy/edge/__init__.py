"""The HTTP edge: routes, request validation, authentication, admin reads, session outcomes, health, and the
SSE relay to the client. Nothing here knows how a turn is supervised; it calls the hooks of :mod:`proxy.hooks`."""
