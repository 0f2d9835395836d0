"""``umit federated`` in-process: every site is a ClientApp call in this process.

The server (:func:`umit.federated.flower.serve` behind the ``ServerApp``) and the sites talk
through a :class:`~umit.federated.flower.LocalGrid`: the same messages, records and strategies as
a deployment of ``flower-superlink`` and ``flower-supernode`` processes, without the processes.
Each site keeps its local state under ``out/sites/<name>`` (on a real deployment: on the site's
own disk, the SuperNode's ``work`` folder).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from umit.config import save_config
from umit.errors import InputError
from umit.federated.config import FederatedConfig, resolve_sites

SITES_DIR = "sites"


def run(cfg: FederatedConfig) -> dict[str, Any]:
    """Run a federation of the configured sites in this process; returns the summary.

    Raises:
        InputError: no sites, a site folder that is not a PREP folder, Flower not installed,
            the sites' plans differ; a site that fails while training is reported in
            ``metrics.jsonl`` and the others go on.
    """
    sites = resolve_sites(cfg)
    try:  # optional dependency: flwr (umit[federated])
        from flwr.app import Context, RecordDict

        from umit.federated.flower import (
            RUN_CONFIG_KEY,
            SUMMARY_FILE,
            LocalGrid,
            client_app,
            server_app,
        )
    except ImportError as exc:
        raise InputError(
            None, f"umit federated needs Flower: pip install 'umit[federated]' ({exc})"
        ) from exc
    if cfg.min_sites is not None and cfg.min_sites > len(sites):
        raise InputError(None, f"min_sites={cfg.min_sites} but only {len(sites)} sites are given")
    cfg = cfg.model_copy(update={"min_sites": cfg.min_sites or len(sites)})
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    config_path = save_config(cfg, out)
    grid = LocalGrid(client_app, [s.node_config(out / SITES_DIR / s.name) for s in sites])
    context = Context(
        run_id=1,
        node_id=0,
        node_config={},
        state=RecordDict(),
        run_config={RUN_CONFIG_KEY: str(config_path)},
    )
    server_app(grid, context)
    return json.loads((out / SUMMARY_FILE).read_text())
