"""Bit-reproducible stages on CPU: ``umit pretrain`` (store crops, augmentation, MAE masking,
evaluation with the kNN/probe monitor every few steps) and ``umit finetune`` give identical
weights for the same config and seed, and a pretraining run killed with SIGKILL and resumed
ends with the weights of an uninterrupted one."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from umit.config import build_config
from umit.finetune.run import FinetuneConfig
from umit.finetune.run import run as finetune
from umit.ssl.pretrain import PretrainConfig
from umit.ssl.pretrain import run as pretrain
from umit.train.metrics import read_metrics

pytestmark = pytest.mark.usefixtures("one_thread")

PRETRAIN = [
    "method=mae",
    "model=vit3d_test_p16",
    "crop_size=[32,32,16]",
    "foreground_prob=0.5",
    "augment.flip_prob=0.5",
    "augment.intensity_scale=0.1",
    "augment.intensity_shift=0.1",
    "mae.decoder_dim=32",
    "mae.decoder_depth=1",
    "mae.decoder_heads=4",
    "monitor_label=sex",
    "monitor_cases=8",
    "monitor_k=3",
    "val_cases=2",
    "val_crops=2",
    "train.total_steps=12",
    "train.warmup_steps=2",
    "train.batch_size=2",
    "train.log_every=2",
    "train.eval_every=3",
    "train.ckpt_every=4",
    "train.progress=false",
]
TIMING = {"time_s", "samples_per_s", "tokens_per_s", "flops_per_s", "step_time_s", "data_time_s"}


def _state(path):
    return torch.load(path, weights_only=True)["state_dict"]


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _curve(out):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in read_metrics(out)]


def test_pretrain_twice_gives_identical_weights_and_curves(tiny_ct_store, tmp_path):
    for name in ("a", "b"):
        pretrain(
            build_config(PretrainConfig, None, PRETRAIN, data=tiny_ct_store, out=tmp_path / name)
        )
    assert _same(_state(tmp_path / "a/encoder.pt"), _state(tmp_path / "b/encoder.pt"))
    assert _curve(tmp_path / "a") == _curve(tmp_path / "b")
    assert any("knn_acc" in r for r in _curve(tmp_path / "a"))  # evaluation ran in between


KILLER = textwrap.dedent(
    """
    import os, signal, sys
    import torch
    torch.set_num_threads(1)
    from umit.config import build_config
    from umit.ssl import pretrain as stage

    call = stage.PretrainTask.__call__
    seen = {"n": 0}

    def dying_call(self, batch):
        seen["n"] += 1
        if seen["n"] == int(sys.argv[3]):  # mid-run, after the step-4 checkpoint
            os.kill(os.getpid(), signal.SIGKILL)
        return call(self, batch)

    stage.PretrainTask.__call__ = dying_call
    cfg = build_config(stage.PretrainConfig, None, sys.argv[4:], data=sys.argv[1], out=sys.argv[2])
    stage.run(cfg)
    """
)


def test_pretrain_killed_and_resumed_equals_an_uninterrupted_run(tiny_ct_store, tmp_path):
    ref = tmp_path / "ref"
    pretrain(build_config(PretrainConfig, None, PRETRAIN, data=tiny_ct_store, out=ref))
    out = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", KILLER, str(tiny_ct_store), str(out), "7", *PRETRAIN],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr
    assert not (out / "encoder.pt").exists() and (out / "step_000004.pt").is_file()
    summary = pretrain(build_config(PretrainConfig, None, PRETRAIN, data=tiny_ct_store, out=out))
    assert _same(_state(ref / "encoder.pt"), _state(out / "encoder.pt"))
    assert _curve(ref)[-1] == _curve(out)[-1]
    # the untrained model's scores are the ones measured before the kill, not the resumed model's
    first = pretrain(build_config(PretrainConfig, None, PRETRAIN, data=tiny_ct_store, out=ref))
    assert summary["initial_val_loss"] == first["initial_val_loss"]


def test_finetune_twice_gives_identical_weights(tiny_ct_store, tmp_path):
    args = [
        "model=unetr",
        "model_args={encoder: vit3d_test_p16, feature_size: 8}",
        "crop_size=[32,32,16]",
        "label_count=4",
        "augment.flip_prob=0.5",
        "foreground_prob=0.5",
        "train.total_steps=6",
        "train.warmup_steps=1",
        "train.eval_every=3",
        "train.progress=false",
    ]
    for name in ("a", "b"):
        finetune(build_config(FinetuneConfig, None, args, data=tiny_ct_store, out=tmp_path / name))
    assert _same(_state(tmp_path / "a/best.pt"), _state(tmp_path / "b/best.pt"))
    assert _curve(tmp_path / "a") == _curve(tmp_path / "b")
