"""Chat-media gateway: receives WhatsApp webhooks, stores their media durably, forwards to bots.

Plugins implement hooks with :data:`hookimpl` (see :mod:`gateway.hookspecs`).
"""

from gateway.hookspecs import hookimpl

__all__ = ["hookimpl"]
