"""The pluggy markers of the ``gateway`` project (DESIGN §4), as plugins import them.

A plugin marks its hook implementations with :data:`hookimpl`; the hook specifications
(:mod:`gateway.hookspecs`, where these names are defined) are marked with :data:`hookspec`. Both
belong to the project name :data:`PROJECT`, which is also the entry-point group plugins register
under. :class:`MediaInfo` is what ``check_media`` sees; :data:`MediaRecord` what the notification
hooks receive.
"""

from __future__ import annotations

from gateway.hookspecs import PROJECT, MediaInfo, MediaRecord, hookimpl, hookspec

__all__ = ["PROJECT", "MediaInfo", "MediaRecord", "hookimpl", "hookspec"]
