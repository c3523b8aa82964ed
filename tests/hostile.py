"""Shared pieces of the hostile-input runs (``tests/test_properties.py`` and ``bench/fuzz.py``):
the documented payloads pointed at media the emulators really serve, and the key paths of a JSON
document (the places a mutation may change)."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

from tests.emulators.graph import GraphEmulator
from tests.emulators.waha import WahaEmulator

FIXTURES = Path(os.environ.get("GATEWAY_FIXTURES", Path(__file__).resolve().parent / "fixtures"))
MEDIA = FIXTURES / "media"
MANIFEST: dict[str, dict[str, Any]] = json.loads((MEDIA / "MANIFEST.json").read_text())
WAHA_TEMPLATES = [json.loads((FIXTURES / "payloads" / "waha" / n).read_text())
                  for n in ("message_image.json", "message_document.json")]
META_TEMPLATES = [json.loads((FIXTURES / "payloads" / "meta" / n).read_text())
                  for n in ("webhook_image.json", "webhook_document.json")]


def paths_of(node: Any, prefix: tuple = ()) -> list[tuple]:
    """Every key path (dict keys, list indexes) in a JSON document, containers included."""
    out = [prefix] if prefix else []
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else []
    for key, child in items:
        out.extend(paths_of(child, (*prefix, key)))
    return out


def real_media_templates(waha: WahaEmulator, graph: GraphEmulator) -> dict[str, list[dict[str, Any]]]:
    """``{"waha": [...], "meta": [...]}``: the documented image and document payloads with their
    media pointed at ``photo.jpg`` and ``invoice.pdf`` registered in the emulators (Meta's with
    the right base64 ``sha256``)."""
    waha_templates, meta_templates = copy.deepcopy(WAHA_TEMPLATES), copy.deepcopy(META_TEMPLATES)
    for name, wt, mt in zip(("photo.jpg", "invoice.pdf"), waha_templates, meta_templates):
        wt["payload"]["media"]["url"] = waha.add_file(MEDIA / name)
        msg = mt["entry"][0]["changes"][0]["value"]["messages"][0]
        msg[msg["type"]].update(id=graph.add_media(MEDIA / name, MANIFEST[name]["mime"]),
                                sha256=MANIFEST[name]["sha256_base64"])
    return {"waha": waha_templates, "meta": meta_templates}


DELETE = object()
"""For :func:`replace_at`: remove the key or item instead of replacing it."""


def replace_at(data: Any, path: tuple, value: Any) -> None:
    """Set (or with :data:`DELETE` remove) the value at ``path`` in ``data``, in place; nothing
    when an earlier change made the path unreachable."""
    parent = data
    try:
        for key in path[:-1]:
            parent = parent[key]
        if value is DELETE:
            del parent[path[-1]]
        else:
            parent[path[-1]] = value
    except (KeyError, IndexError, TypeError):
        pass
