"""The gateway's storage contract suite (shipped with the gateway as a pytest plugin), run
against this backend: ``pytest`` in this directory."""

from gateway.sdk.testing import *  # noqa: F403
