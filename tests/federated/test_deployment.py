"""Deployment mode: ``scripts/federated_local.sh`` starts a SuperLink and three SuperNodes on
127.0.0.1 and runs the umit Flower App; one SuperNode is killed with SIGKILL mid-run and the
server finishes with the other two (``min_sites=2``), writing every round's checkpoint."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

pytest.importorskip("flwr")

from umit.train.checkpoint import load_artifact, load_encoder  # noqa: E402
from umit.train.metrics import read_metrics  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "federated_local.sh"

pytestmark = [pytest.mark.slow, pytest.mark.multiproc]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(1.0)
    raise AssertionError(f"timed out waiting for {what}")


def test_three_supernodes_one_killed_mid_run(tiny_ct_store, tmp_path):
    if shutil.which("flower-superlink", path=str(Path(sys.executable).parent)) is None:
        pytest.skip("flower-superlink is not installed next to this Python")
    server = tmp_path / "server"
    fed = {
        "task": "pretrain",
        "out": str(server),
        "rounds": 3,
        "local_steps": 2,
        "min_sites": 2,
        "round_timeout": 600,
        "pretrain": {
            "model": "vit3d_test_p16",
            "crop_size": [32, 32, 16],
            "mae": {"decoder_dim": 16, "decoder_depth": 1, "decoder_heads": 2},
            "val_cases": 0,
            "train": {"batch_size": 2, "warmup_steps": 1, "progress": False},
        },
    }
    (tmp_path / "fed.yaml").write_text(yaml.safe_dump(fed))
    work = tmp_path / "work"
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO / "src"),
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "UMIT_FLWR_PORT": str(_free_port()),
        "OMP_NUM_THREADS": "1",
    }
    sites = [f"site_{c}={tiny_ct_store}:site=site_{c}" for c in "abc"]
    proc = subprocess.Popen(
        ["bash", str(SCRIPT), str(tmp_path / "fed.yaml"), str(work), *sites],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:

        def round_done(n: int) -> bool:
            return any(
                r.get("site") == "global" and r.get("split") == "train" and r["round"] == n
                for r in read_metrics(server)
            )

        _wait_for(lambda: round_done(1), 600, "round 1")
        victim = int((work / "supernode-site_c.pid").read_text())
        os.kill(victim, signal.SIGKILL)  # round 2 is being configured or trained
        out, _ = proc.communicate(timeout=900)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
    summary = yaml.safe_load((server / "summary.json").read_text())
    assert summary["rounds"] == 3, out[-3000:]
    recs = read_metrics(server)
    glob = {r["round"]: r for r in recs if r["site"] == "global" and r["split"] == "train"}
    assert sorted(glob) == [1, 2, 3]
    assert glob[1]["sites_ok"] == 3
    assert glob[3]["sites_ok"] == 2  # the others went on
    # the SuperLink answers for the dead node (code 5, node unavailable): reported by site name
    lost = [r for r in recs if r["site"] == "site_c" and r.get("error")]
    assert lost and all("error code 5" in r["error"] for r in lost), recs
    assert not any(r["site"].startswith("node-") for r in recs)
    assert "site_c" in glob[3]["sites_absent"]
    assert [r["round"] for r in recs if r["site"] == "site_c" and "loss" in r] == [1]
    for step in (2, 4, 6):  # no checkpoint lost
        ckpt = load_artifact(server / f"step_{step:06d}.pt", expect="train_state")
        assert ckpt["federated"]["round"] == step // 2
    load_encoder(server / "encoder.pt")
    # every API was bound to the loopback interface
    for log in work.glob("*.log"):
        assert "0.0.0.0" not in log.read_text(), log
