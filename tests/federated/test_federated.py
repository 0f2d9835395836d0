"""``umit federated`` in-process on a tiny phantom store (3 sites split by the catalog ``site``).

Equivalences that pin the algorithm down: one site equals centralised training with the same
seed; two sites with identical data equal one; FedProx with mu=0 equals FedAvg; a server killed
with SIGKILL mid-round and rerun equals an uninterrupted run. And the failure paths: a site
with a corrupt store is reported while the others go on; bad settings are refused by name.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

pytest.importorskip("flwr")

from umit.config import build_config  # noqa: E402
from umit.errors import InputError  # noqa: E402
from umit.federated.config import FederatedConfig  # noqa: E402
from umit.federated.run import run  # noqa: E402
from umit.federated.site import ProximalTask  # noqa: E402
from umit.ssl.pretrain import PretrainConfig  # noqa: E402
from umit.ssl.pretrain import run as pretrain  # noqa: E402
from umit.train.checkpoint import load_artifact, load_encoder, step_name  # noqa: E402
from umit.train.metrics import read_metrics  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

ROUNDS, LOCAL = 3, 2
PRETRAIN = [
    "pretrain.model=vit3d_test_p16",
    "pretrain.crop_size=[32,32,16]",
    "pretrain.mae.decoder_dim=32",
    "pretrain.mae.decoder_depth=1",
    "pretrain.mae.decoder_heads=4",
    "pretrain.augment.flip_prob=0.5",
    "pretrain.val_cases=0",
    "pretrain.train.batch_size=2",
    "pretrain.train.warmup_steps=1",
    "pretrain.train.lr=1e-3",
]


def fed_cfg(out: Path, *extra: str, **values) -> FederatedConfig:
    overrides = [
        "task=pretrain",
        f"rounds={ROUNDS}",
        f"local_steps={LOCAL}",
        "evaluate=false",
        *PRETRAIN,
        *extra,
    ]
    return build_config(FederatedConfig, None, overrides, out=out, **values)


def global_weights(out: Path) -> dict[str, torch.Tensor]:
    return load_artifact(out / "latest.pt", expect="train_state")["model"]


def assert_close(a: dict, b: dict, atol: float = 1e-6) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k].float(), b[k].float(), atol=atol, rtol=0, msg=k)


def copy_store(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_one_site_equals_centralised_training(tiny_ct_store, tmp_path):
    fed = run(fed_cfg(tmp_path / "fed", sites=[tiny_ct_store]))
    assert fed["rounds"] == ROUNDS
    section = {k.split(".", 1)[1]: v for k, v in (o.split("=", 1) for o in PRETRAIN)}
    central = build_config(
        PretrainConfig,
        None,
        [f"{k}={v}" for k, v in section.items()]
        + [f"train.total_steps={ROUNDS * LOCAL}", "train.progress=false"],
        data=tiny_ct_store,
        out=tmp_path / "central",
    )
    pretrain(central)
    # the whole MAE wrapper (encoder + decoder) after 6 steps, and the encoder.pt of both
    assert_close(global_weights(tmp_path / "fed"), global_weights(tmp_path / "central"))
    assert_close(
        load_artifact(tmp_path / "fed/encoder.pt")["state_dict"],
        load_artifact(tmp_path / "central/encoder.pt")["state_dict"],
    )
    start = load_artifact(tmp_path / "fed/step_000002.pt")["model"]
    assert not torch.equal(start["decoder_pred.weight"], global_weights(tmp_path / "fed")[
        "decoder_pred.weight"
    ])  # fmt: skip


def test_two_sites_with_identical_data_equal_one_site(tiny_ct_store, tmp_path):
    a = copy_store(tiny_ct_store, tmp_path / "h1" / "prep")
    b = copy_store(tiny_ct_store, tmp_path / "h2" / "prep")
    two = run(fed_cfg(tmp_path / "two", sites=[a, b]))
    assert two["sites"] == ["h1-prep", "h2-prep"]
    run(fed_cfg(tmp_path / "one", sites=[a]))
    assert_close(global_weights(tmp_path / "two"), global_weights(tmp_path / "one"), atol=0)
    records = [r for r in read_metrics(tmp_path / "two") if r["split"] == "train"]
    per_site = [r for r in records if r["site"] != "global"]
    assert sorted({r["site"] for r in per_site}) == ["h1-prep", "h2-prep"]
    assert [r["round"] for r in records if r["site"] == "global"] == [1, 2, 3]


def test_fedprox_with_mu_zero_equals_fedavg_and_mu_pulls_towards_the_global(
    tiny_ct_store, tmp_path
):
    avg = fed_cfg(tmp_path / "avg", data=tiny_ct_store)
    prox0 = fed_cfg(tmp_path / "prox0", "strategy=fedprox", "proximal_mu=0", data=tiny_ct_store)
    run(avg)
    run(prox0)
    assert_close(global_weights(tmp_path / "avg"), global_weights(tmp_path / "prox0"), atol=0)
    site_recs = [r for r in read_metrics(tmp_path / "prox0") if r.get("site") == "site_a"]
    assert all("proximal" in r for r in site_recs)  # the term was there, at weight 0

    def drift(mu: float) -> float:  # mean ||w - w_global||^2 over 6 local steps of one round
        out = tmp_path / f"mu{mu:g}"
        args = ("strategy=fedprox", f"proximal_mu={mu}", "rounds=1", "local_steps=6")
        run(fed_cfg(out, *args, sites=[tiny_ct_store]))
        return next(r["proximal"] for r in read_metrics(out) if r.get("site") == "prep")

    # Adam's first step moves every weight by about lr whatever mu is; from then on a large
    # mu pulls the site back towards the global weights
    assert drift(1000) < 0.5 * drift(0)


def test_proximal_term_by_hand():
    torch.manual_seed(0)
    lin = torch.nn.Linear(3, 2)

    class Task:
        def trainable_module(self):
            return lin

        def __call__(self, batch):
            return {"loss": lin(batch).sum()}

    task = ProximalTask(Task(), mu=0.5)
    task.set_anchor()
    anchor = [p.detach().clone() for p in lin.parameters()]
    with torch.no_grad():
        for p in lin.parameters():
            p.add_(0.1)
    x = torch.ones(1, 3)
    out = task(x)
    dist = sum(((p - a) ** 2).sum() for p, a in zip(lin.parameters(), anchor, strict=True))
    torch.testing.assert_close(out["loss"], lin(x).sum() + 0.25 * dist)
    torch.testing.assert_close(out["proximal"], torch.tensor(0.1**2 * 8))
    out["loss"].backward()
    # d/dw of mu/2 ||w - a||^2 is mu (w - a) = 0.05 on top of the task's gradient
    torch.testing.assert_close(lin.bias.grad, torch.ones(2) + 0.05)
    assert task.trainable_module() is lin  # everything else is the wrapped task's
    with pytest.raises(ValueError, match="mu must be >= 0"):
        ProximalTask(Task(), mu=-1)


def test_optimizer_state_reset_gives_every_round_fresh_adam_moments(tiny_ct_store, tmp_path):
    """keep vs reset, one site, one step per round, constant lr, no weight decay: round 1 is the
    same; round 2's update under ``reset`` is Adam's first step from the global weights, which
    moves every weight by lr (m / sqrt(v) = g / |g|), under ``keep`` it is Adam's second step
    (moments of both rounds' gradients), which does not."""
    lr = 1e-3
    args = [
        "rounds=2",
        "local_steps=1",
        f"pretrain.train.lr={lr}",
        f"pretrain.train.min_lr={lr}",
        "pretrain.train.warmup_steps=0",
        "pretrain.train.weight_decay=0",
        "pretrain.train.eps=1e-20",  # below every gradient: m / (sqrt(v) + eps) = g / |g|
    ]
    weights = {}
    for mode in ("keep", "reset"):
        out = tmp_path / mode
        run(fed_cfg(out, *args, f"optimizer_state={mode}", sites=[tiny_ct_store]))
        weights[mode] = [load_artifact(out / step_name(r))["model"] for r in (1, 2)]
    assert_close(weights["keep"][0], weights["reset"][0], atol=0)  # round 1: fresh in both

    def steps_of_lr(mode: str) -> float:
        """Fraction of the weights round 2 moved whose move is lr (within 2 %)."""
        before, after = weights[mode]
        moved = torch.cat([(after[k] - before[k]).abs().flatten() for k in before])
        moved = moved[moved > 0]
        assert moved.numel() > 1000
        return float(((moved - lr).abs() < 0.02 * lr).float().mean())

    fractions = {mode: steps_of_lr(mode) for mode in weights}
    assert fractions["reset"] > 0.99
    assert fractions["keep"] < 0.5
    diff = max(
        (weights["keep"][1][k] - weights["reset"][1][k]).abs().max() for k in weights["keep"][1]
    )
    assert diff > 0.1 * lr
    with pytest.raises(InputError, match=r"optimizer_state: Input should be 'keep' or 'reset'"):
        fed_cfg(tmp_path, "optimizer_state=zero")
    # the run key (sites' state folder, the server's resume check) changes only with reset
    base = fed_cfg(tmp_path, data=tiny_ct_store)
    assert fed_cfg(tmp_path, "optimizer_state=keep", data=tiny_ct_store).run_key() == base.run_key()
    assert (
        fed_cfg(tmp_path, "optimizer_state=reset", data=tiny_ct_store).run_key() != base.run_key()
    )


KILLER = textwrap.dedent(
    """
    import os, signal, sys
    import torch
    torch.set_num_threads(1)
    from umit.config import build_config
    from umit.federated.config import FederatedConfig
    from umit.federated.run import run
    from umit.federated import site as site_mod

    kill_round, kill_site = int(sys.argv[2]), sys.argv[3]
    original = site_mod.Site.train_round

    def train_round(self, state, server_round, *args, **kwargs):
        result = original(self, state, server_round, *args, **kwargs)
        if server_round == kill_round and self.name == kill_site:
            os.kill(os.getpid(), signal.SIGKILL)  # mid-round: this site done, the next not
        return result

    site_mod.Site.train_round = train_round
    run(build_config(FederatedConfig, sys.argv[1]))
    """
)


# reset: ~90 s on the shared 2-core machine (the keep case, the default, stays in the suite)
@pytest.mark.parametrize("optimizer_state", ["keep", pytest.param("reset", marks=pytest.mark.slow)])
def test_server_killed_mid_round_resumes_to_the_uninterrupted_result(
    tiny_ct_store, tmp_path, optimizer_state
):
    state = f"optimizer_state={optimizer_state}"
    cfg = fed_cfg(tmp_path / "killed", state, data=tiny_ct_store)
    path = tmp_path / "fed.yaml"
    from umit.config import save_config

    save_config(cfg, tmp_path, name="fed.yaml")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "src")}
    proc = subprocess.run(
        [sys.executable, "-c", KILLER, str(path), "2", "site_b"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    ckpt = load_artifact(tmp_path / "killed/latest.pt", expect="train_state")
    assert ckpt["federated"]["round"] == 1  # round 2 was under way
    assert (tmp_path / "killed/sites/site_a").is_dir()  # site_a had trained round 2 already

    resumed = run(cfg)
    assert resumed["resumed_at_round"] == 1
    run(fed_cfg(tmp_path / "straight", state, data=tiny_ct_store))
    assert_close(global_weights(tmp_path / "killed"), global_weights(tmp_path / "straight"), atol=0)
    assert_close(
        load_artifact(tmp_path / "killed/encoder.pt")["state_dict"],
        load_artifact(tmp_path / "straight/encoder.pt")["state_dict"],
        atol=0,
    )

    # the log holds each round once per site, as the uninterrupted one does
    def rows(out):
        return [(r["round"], r["site"]) for r in read_metrics(out) if r["split"] == "train"]

    assert rows(tmp_path / "killed") == rows(tmp_path / "straight")


def test_a_site_with_a_corrupt_store_is_reported_and_the_others_go_on(tiny_ct_store, tmp_path):
    good = [copy_store(tiny_ct_store, tmp_path / n / "prep") for n in ("h1", "h2")]
    bad = copy_store(tiny_ct_store, tmp_path / "h3" / "prep")
    chunks = [p for p in (bad / "store.zarr" / "cases").rglob("image/c/*/*/*/*") if p.is_file()]
    assert chunks
    for p in chunks:
        p.write_bytes(b"not a zstd frame")
    s = run(fed_cfg(tmp_path / "fed", sites=[*good, bad]))
    assert s["rounds"] == ROUNDS
    recs = read_metrics(tmp_path / "fed")
    errors = [r for r in recs if r.get("error")]
    assert [r["round"] for r in errors] == [1, 2, 3]
    assert {r["site"] for r in errors} == {"h3-prep"}
    glob = [r for r in recs if r["site"] == "global" and r["split"] == "train"]
    assert [(r["sites_ok"], r["sites_failed"]) for r in glob] == [(2, 1)] * ROUNDS
    load_encoder(tmp_path / "fed/encoder.pt")  # the run finished with the other two


def test_bad_settings_are_refused_naming_the_problem(tiny_ct_store, tmp_path):
    with pytest.raises(InputError, match=r"strategy: Input should be 'fedavg' or 'fedprox'"):
        fed_cfg(tmp_path, "strategy=fedsgd")
    with pytest.raises(InputError, match=r"proximal_mu: Input should be greater than or equal"):
        fed_cfg(tmp_path, "strategy=fedprox", "proximal_mu=-0.1")
    with pytest.raises(InputError, match=r"proximal_mu=0.5 is only used by strategy=fedprox"):
        fed_cfg(tmp_path, "proximal_mu=0.5")
    with pytest.raises(InputError, match=r"pretrain.train.bogus: Extra inputs"):
        fed_cfg(tmp_path, "pretrain.train.bogus=1")
    with pytest.raises(InputError, match=r"pretrain.data: each site's data"):
        fed_cfg(tmp_path, "pretrain.data=/x")
    with pytest.raises(InputError, match="no sites"):
        run(fed_cfg(tmp_path / "none"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match=rf"{empty}: no store.zarr here"):
        run(fed_cfg(tmp_path / "x", sites=[tiny_ct_store, empty]))
    with pytest.raises(InputError, match=r"nowhere: site folder not found"):
        run(fed_cfg(tmp_path / "x", sites=[tmp_path / "nowhere"]))
    with pytest.raises(InputError, match=r"site_values \['site_z'\] not found in 'site'"):
        run(fed_cfg(tmp_path / "x", "site_values=[site_a,site_z]", data=tiny_ct_store))
    with pytest.raises(InputError, match=r"no case has the catalog attribute 'hospital'"):
        run(fed_cfg(tmp_path / "x", "site_key=hospital", data=tiny_ct_store))


def test_sites_preprocessed_with_different_plans_are_refused(tiny_ct_store, tmp_path):
    a = copy_store(tiny_ct_store, tmp_path / "h1" / "prep")
    b = copy_store(tiny_ct_store, tmp_path / "h2" / "prep")
    plan = json.loads((b / "plan.json").read_text())
    plan["target_spacing"] = [1.0, 1.0, 1.0]
    (b / "plan.json").write_text(json.dumps(plan))
    with pytest.raises(InputError, match=r"different plans \(fields \['target_spacing'\]\)"):
        run(fed_cfg(tmp_path / "x", sites=[a, b]))
