"""The HTTP layer: one module per resource, :mod:`~gateway.web.errors` (one ``ApiError`` and its
middleware), :mod:`~gateway.web.models` (request and response bodies) and
:mod:`~gateway.web.routes` (the one route table: the router and ``/openapi.json``). It sits above
the core: no module outside this package imports it, except :mod:`gateway.app`."""
