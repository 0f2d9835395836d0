"""What one federated round costs: bytes each site sends and receives, and wall time per round.

    python -m benchmarks.federated_round [--prep PREP] [--models vit3d_tiny_p16 vit3d_base_p16]
        [--crop 64 64 64] [--local-steps 2] [--batch 2] [--out DIR]

Bytes: ``ArrayRecord(state_dict).count_bytes()`` of what travels in each direction per site and
round (the MAE wrapper for pretraining at a 96³ crop, the UNETR for fine-tuning), and what that
means for 10 hospitals behind one 100 Mbit/s link. Time: one in-process round (3 sites split by
the catalog ``site`` of PREP, or a freshly made phantom store) per model, split into the sites'
local training and the rest (serialization, averaging, checkpoint). Prints a table and writes
``benchmarks/results/<machine>-<date>-federated_round.json``; no test asserts on these numbers.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from datetime import date
from pathlib import Path

import torch
from flwr.app import ArrayRecord

from umit.config import build_config
from umit.federated.config import STAGE_PLACEHOLDER, FederatedConfig
from umit.finetune.run import build_model
from umit.ssl.pretrain import build_method
from umit.train.metrics import read_metrics

RESULTS = Path(__file__).resolve().parent / "results"
LINK_BITS_PER_S = 100e6
HOSPITALS = 10


def payload_bytes(models: list[str]) -> list[dict]:
    rows = []
    for name in models:
        pre = FederatedConfig.model_validate(
            {"pretrain": {"model": name, "crop_size": [96, 96, 96]}}
        ).stage_config(STAGE_PLACEHOLDER)
        mae = build_method(pre, in_chans=1)
        ft = FederatedConfig.model_validate(
            {"task": "finetune", "finetune": {"model_args": {"encoder": name}}}
        ).stage_config(STAGE_PLACEHOLDER)
        unetr = build_model(ft, in_chans=1, num_outputs=14)
        for what, module in (("MAE pretraining (wrapper)", mae), ("UNETR fine-tuning", unetr)):
            n = ArrayRecord({k: v.detach() for k, v in module.state_dict().items()}).count_bytes()
            # per round the server sends n to every hospital and receives n from each, over one link
            link_s = 2 * HOSPITALS * n * 8 / LINK_BITS_PER_S
            rows.append(
                {
                    "model": name,
                    "what": what,
                    "params": sum(p.numel() for p in module.parameters()),
                    "bytes_per_site_each_way": n,
                    "link_s_10_hospitals_100mbit": link_s,
                }
            )
        del mae, unetr
    return rows


def phantom_store(root: Path) -> Path:
    from umit.data.phantoms import write_phantom_collection
    from umit.ingest.run import IngestConfig
    from umit.ingest.run import run as ingest
    from umit.preprocess.run import PreprocessConfig
    from umit.preprocess.run import run as preprocess

    write_phantom_collection(root / "src", n=9, modality="ct", seed=5, shape=(64, 64, 48))
    ingest(IngestConfig(src=root / "src", out=root / "raw"), progress=False)
    preprocess(PreprocessConfig(raw=root / "raw", out=root / "prep", workers=1))
    return root / "prep"


def round_time(prep: Path, model: str, crop: list[int], steps: int, batch: int, out: Path) -> dict:
    from umit.federated.run import run

    cfg = build_config(
        FederatedConfig,
        None,
        [
            "rounds=1",
            f"local_steps={steps}",
            "evaluate=false",
            "resume=false",
            f"pretrain.model={model}",
            f"pretrain.crop_size=[{','.join(map(str, crop))}]",
            "pretrain.val_cases=0",
            f"pretrain.train.batch_size={batch}",
            "pretrain.train.warmup_steps=0",
            "pretrain.train.progress=false",
        ],
        data=prep,
        out=out,
    )
    started = time.perf_counter()
    run(cfg)
    total = time.perf_counter() - started
    recs = [r for r in read_metrics(out) if r["split"] == "train"]
    sites = [r for r in recs if r["site"] != "global"]
    glob = next(r for r in recs if r["site"] == "global")
    local = sum(r["seconds"] for r in sites)
    return {
        "model": model,
        "crop": crop,
        "local_steps": steps,
        "batch": batch,
        "sites": len(sites),
        "round_s": glob["round_s"],
        "sites_local_s": local,
        "overhead_s": glob["round_s"] - local,
        "run_s": total,
        "bytes_down_per_site": glob["bytes_down_per_site"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--prep", type=Path, default=None)
    ap.add_argument("--models", nargs="+", default=["vit3d_tiny_p16", "vit3d_base_p16"])
    ap.add_argument("--crop", nargs=3, type=int, default=[64, 64, 64])
    ap.add_argument("--local-steps", type=int, default=2)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--skip-time", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    result = {
        "machine": f"{platform.node()} {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} torch threads, CPU",
        "date": str(date.today()),
        "bytes": payload_bytes(args.models),
        "rounds": [],
    }
    for r in result["bytes"]:
        print(
            f"{r['model']:16s} {r['what']:26s} {r['params'] / 1e6:7.1f} M params "
            f"{r['bytes_per_site_each_way'] / 1e6:8.1f} MB per site each way; 10 hospitals on "
            f"100 Mbit/s: {r['link_s_10_hospitals_100mbit']:6.0f} s of link per round"
        )
    if not args.skip_time:
        with tempfile.TemporaryDirectory() as tmp:
            prep = args.prep or phantom_store(Path(tmp))
            for model in args.models:
                r = round_time(
                    prep, model, args.crop, args.local_steps, args.batch, Path(tmp) / model
                )
                result["rounds"].append(r)
                print(
                    f"{model:16s} one round, {r['sites']} sites x {r['local_steps']} steps of "
                    f"batch {r['batch']} at {r['crop']}: {r['round_s']:.1f} s (local training "
                    f"{r['sites_local_s']:.1f} s, the rest {r['overhead_s']:.1f} s)"
                )
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{platform.node()}-{date.today()}-federated_round.json"
    path.write_text(json.dumps(result, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
