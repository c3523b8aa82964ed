"""Chat-media gateway: receives WhatsApp webhooks, stores their media durably, forwards to bots.

Plugins import from :mod:`gateway.sdk` only (hook markers, contracts, records, helpers); the hooks
are listed in :mod:`gateway.hookspecs`. ``gateway.hookimpl`` stays as a short alias of
:data:`gateway.sdk.hookimpl`.
"""

from gateway.sdk.hooks import hookimpl

__all__ = ["hookimpl"]
