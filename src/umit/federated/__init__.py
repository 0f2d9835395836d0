"""Federated pretraining and fine-tuning: the data never leaves the site.

Framework-neutral: :mod:`~umit.federated.config` (settings, sites), :mod:`~umit.federated.site`
(what a site does in a round) and :mod:`~umit.federated.server` (the global model, its
checkpoints and metrics). Flower: :mod:`~umit.federated.flower` (ClientApp, ServerApp, an
in-process Grid), imported only when a run starts (``flwr`` is the optional ``federated`` extra).
"""
