"""``umit federated``: federated pretraining or fine-tuning over sites whose data stays put.

In-process (tests, laptops): ``umit federated sites=[PREP_A,PREP_B,PREP_C] task=pretrain
rounds=5 local_steps=20 pretrain.model=vit3d_tiny_p16 ...`` or one PREP split by a catalog
attribute: ``--data PREP site_key=site``. Deployment (a SuperLink and one SuperNode per site):
see docs/federated.md and scripts/federated_local.sh.
"""

from __future__ import annotations

import argparse

from umit.cli.common import add_config_args


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "federated",
        help="federated pretraining / fine-tuning on Flower (FedAvg, FedProx): sites train on "
        "their own stores, only weights travel",
        description=__doc__,
    )
    p.add_argument("--data", default=None, help="one PREP folder split into sites by site_key")
    p.add_argument("--out", default=None, help="server run folder (or out=DIR)")
    add_config_args(p)
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from umit.config import build_config
    from umit.federated.config import FederatedConfig
    from umit.federated.run import run

    cfg = build_config(FederatedConfig, args.config, args.overrides, data=args.data, out=args.out)
    s = run(cfg)
    print(
        f"federated {s['task']} ({s['strategy']}): {s['rounds']} rounds over sites "
        f"{', '.join(s['sites'])} in {s['seconds']:.0f} s"
        + (f" (resumed after round {s['resumed_at_round']})" if s["resumed_at_round"] else "")
    )
    print(f"  metrics: {s['out']}/metrics.jsonl  model: {s['artifact']}")
    return 0
