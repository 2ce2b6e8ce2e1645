"""``batchpool serve``: a pool behind an HTTP endpoint, and the Prometheus metrics of a pool.

- ``service``: the jobs a server accepted, around one Pool: backpressure, waiting without
  cancelling, cancellation, the drain at shutdown.
- ``store``: the server's journal (``--journal``): accepted jobs and their results in SQLite, so
  that a restarted server runs what it had accepted and still answers for what it finished.
- ``app``: the ASGI app (Starlette) that maps SPEC section 4's requests onto the service.
- ``server``: uvicorn in this process, with the signals of a drain.
- ``metrics``: a prometheus_client collector reading ``Pool.metrics()`` snapshots, and the
  exporter of ``batchpool run --metrics-port``.

Everything here but this module needs the ``serve`` extra (starlette, uvicorn,
prometheus_client); ``missing()`` says what is not installed, so the CLI refuses in one line.
"""

from __future__ import annotations

import importlib

EXTRA = ("starlette", "uvicorn", "prometheus_client")
INSTALL_HINT = "pip install 'batchpool[serve]' (in a checkout: pip install '.[serve]')"


def missing(modules: tuple[str, ...] = EXTRA) -> list[str]:
    """The modules of the extra that cannot be imported here."""
    gone = []
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError:
            gone.append(name)
    return gone
