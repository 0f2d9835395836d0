"""Cross-phase CT pretraining: multiphase phantom exams, exam grouping and grid alignment, the
wrapper's loss and baseline, and `umit pretrain method=cross_phase` into a fine-tuning network."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
import torch

from umit.data.phantoms import write_phantom_collection
from umit.data.store import Store
from umit.errors import InputError
from umit.models import create_model
from umit.models.heads import feature_map
from umit.ssl.cross_phase import CrossPhase3D, PhaseGroupCrops, _voxel_offset, phase_groups

PHASES = ["none", "arterial", "portal"]


def _tiny_unetr(size: int, out_channels: int) -> torch.nn.Module:
    """A UNETR on the test ViT (patch 8) for ``size``³ one-channel crops."""
    return create_model("unetr", encoder="vit3d_test_p8", feature_size=8,
                        img_size=(size,) * 3, in_chans=1, out_channels=out_channels)  # fmt: skip


@pytest.fixture(scope="module")
def multiphase_store(tmp_path_factory) -> Path:
    """PREP of 4 subjects x 3 phases (one exam each) plus nothing else."""
    from umit.ingest.run import IngestConfig
    from umit.ingest.run import run as ingest
    from umit.preprocess.run import PreprocessConfig
    from umit.preprocess.run import run as preprocess

    root = tmp_path_factory.mktemp("multiphase")
    write_phantom_collection(root / "src", n=4, seed=5, shape=(40, 40, 24), phases=PHASES)
    ingest(IngestConfig(src=root / "src", out=root / "raw"), progress=False)
    preprocess(
        PreprocessConfig(
            raw=root / "raw", out=root / "prep", workers=1, target_spacing=(2.0, 2.0, 3.0)
        )
    )
    return root / "prep"


def test_multiphase_collection_is_one_anatomy_in_each_phase(tmp_path):
    root = write_phantom_collection(tmp_path / "c", n=2, seed=5, shape=(40, 40, 24), phases=PHASES)
    rows = list(csv.DictReader((root / "attributes.csv").open()))
    assert [r["case_id"] for r in rows[:3]] == [f"phantom_ct_0000_{p}" for p in PHASES]
    assert [r["contrast"] for r in rows[:3]] == PHASES
    assert {r["subject_id"] for r in rows[:3]} == {"phantom_ct_0000"}
    assert {r["sex"] for r in rows[:3]} == {rows[0]["sex"]} and {r["site"] for r in rows[:3]} == {
        rows[0]["site"]
    }

    def read(name: str, sub: str = "imagesTr", suffix: str = "_0000") -> np.ndarray:
        return np.asarray(nib.load(root / sub / f"phantom_ct_0000_{name}{suffix}.nii.gz").dataobj)

    labels = [read(p, "labelsTr", "") for p in PHASES]
    assert all(np.array_equal(labels[0], lab) for lab in labels[1:])  # the same anatomy
    none, portal = read("none").astype(float), read("portal").astype(float)
    kidney = np.isin(labels[0], (6, 7))
    # portal venous phase: the kidneys enhance by ~110-150 HU (umit.data.phantoms.ct)
    assert np.median(portal[kidney] - none[kidney]) > 80
    assert json.loads((root / "dataset.json").read_text())["phantom"]["phases"] == PHASES


def test_multiphase_collection_bad_arguments(tmp_path):
    for kwargs, match in (
        ({"phases": ["none"]}, "at least two distinct"),
        ({"phases": ["none", "venous"]}, "at least two distinct"),
        ({"phases": ["none", "none"]}, "at least two distinct"),
        ({"phases": PHASES, "findings": True}, "cannot be combined"),
        ({"phases": PHASES, "modality": "mr"}, "CT only"),
    ):
        with pytest.raises(ValueError, match=match):
            write_phantom_collection(tmp_path / "bad", n=1, shape=(40, 40, 24), **kwargs)
    write_phantom_collection(tmp_path / "c", n=1, shape=(40, 40, 24), phases=PHASES[:2])
    with pytest.raises(InputError, match="use another folder"):  # no mixing on resume
        write_phantom_collection(tmp_path / "c", n=1, shape=(40, 40, 24), phases=PHASES)


def test_phase_groups_pair_the_series_of_each_exam(multiphase_store, tiny_ct_store):
    store = Store(multiphase_store)
    names, groups = phase_groups(store, store.case_ids)
    assert names == sorted(PHASES) and len(groups) == 4
    # in the order of the exams' case ids, not of their subject_id (a hash keyed per catalog)
    assert [g[0] for g in groups.values()] == [f"phantom_ct_{i:04d}_arterial" for i in range(4)]
    for cases in groups.values():
        assert [store.index[c]["contrast"] for c in cases] == names
        assert len({store.index[c]["subject_id"] for c in cases}) == 1
    names, groups = phase_groups(store, store.case_ids, phases=["portal", "none"])
    assert all(c[0].endswith("_portal") and c[1].endswith("_none") for c in groups.values())
    one = [c for c in store.case_ids if c.endswith("_none")]
    with pytest.raises(InputError, match="no subject_id has series of two contrast phases"):
        phase_groups(store, one)
    single = Store(tiny_ct_store)  # one series per subject: nothing to pair
    with pytest.raises(InputError, match="no subject_id has series of two"):
        phase_groups(single, single.case_ids)
    with pytest.raises(InputError, match=r"sex \w has two contrast=\w+ series"):
        phase_groups(store, store.case_ids, group_key="sex")
    with pytest.raises(InputError, match="has no 'study_uid'"):
        phase_groups(store, store.case_ids, group_key="study_uid")


def _fake_store(affines: dict[str, np.ndarray]) -> SimpleNamespace:
    return SimpleNamespace(prep_dir="PREP", case=lambda c: SimpleNamespace(affine=affines[c]))


def test_voxel_offset_follows_the_affines():
    a = np.diag([2.0, 2.0, 3.0, 1.0])
    a[:3, 3] = (-10.0, 5.0, 30.0)
    b = a.copy()
    b[:3, 3] += (4.0, 0.0, -3.0)  # origin 2 voxels further along x, 1 voxel back along z
    store = _fake_store({"ref": a, "other": b, "half": a.copy(), "scaled": np.diag([2, 2, 2, 1.0])})
    # ref voxel v sits at world a @ v = b @ (v - 2 x + 1 z)
    assert _voxel_offset(store, "ref", "other").tolist() == [-2, 0, 1]
    store.case("half").affine[0, 3] += 1.0  # half a voxel
    with pytest.raises(InputError, match="not a whole number"):
        _voxel_offset(store, "ref", "half")
    with pytest.raises(InputError, match="spacing or orientation"):
        _voxel_offset(store, "ref", "scaled")


def test_crops_read_one_world_position_in_every_phase(multiphase_store):
    store = Store(multiphase_store)
    names, groups = phase_groups(store, store.case_ids)
    ds = PhaseGroupCrops(multiphase_store, (16, 16, 16), groups, samples_per_group=3, seed=1)
    assert len(ds) == 12
    for i in range(len(ds)):
        item = ds[i]
        assert item["image"].shape == (1, 16, 16, 16) and item["target"].shape == (3, 16, 16, 16)
        assert item["present"].all()
        torch.testing.assert_close(item["image"][0], item["target"][item["phase"]])
        # the label maps of the phases are one anatomy: read at the offsets, they coincide
        group = ds.groups[i // 3]
        start = None
        for case, off in zip(group, ds.offsets[i // 3], strict=True):
            rng = np.random.default_rng([1, 0, i])
            shape = np.asarray(store.index[ds.refs[i // 3]]["shape"][1:])
            lo, hi = np.minimum(0, shape - 16), np.maximum(0, shape - 16)
            start = rng.integers(lo, hi + 1) + off
            ds.crops.with_label = True
            lab = ds.crops.read_crop(case, start)["label"]
            ds.crops.with_label = False
            if case == group[0]:
                first = lab
            assert torch.equal(lab, first)
    a, b = ds[5], ds[5]
    assert torch.equal(a["target"], b["target"]) and a["phase"] == b["phase"]  # seeded


@pytest.mark.parametrize(
    ("network", "builder"),
    [
        (
            True,
            lambda: _tiny_unetr(16, out_channels=2),
        ),  # fmt: skip
        (False, lambda: create_model("vit3d_test_p8", img_size=(16, 16, 16), in_chans=1)),
    ],
)
def test_cross_phase_starts_at_the_copy_baseline_and_learns_enhancement(network, builder):
    torch.manual_seed(0)
    model = CrossPhase3D(builder(), ["none", "portal"], network=network, decoder_dim=16)
    # tissue at 0.5 that does not change, an organ darker than it in the first phase and
    # brighter in the second (not a global scaling, which instance norms would erase); the
    # input is either phase
    x = torch.zeros(4, 1, 16, 16, 16)
    x[:, :, 2:14, 2:14, 2:14] = 0.5
    organ = torch.zeros_like(x, dtype=torch.bool)
    organ[:, :, 5:11, 5:11, 5:11] = True
    target = torch.cat([torch.where(organ, 0.3, x), torch.where(organ, 1.5, x)], dim=1)
    inputs = torch.cat([target[:2, :1], target[2:, 1:]])
    batch = {"image": inputs, "target": target, "present": torch.ones(4, 2, dtype=torch.bool)}
    first = model(batch)
    torch.testing.assert_close(first["loss"], first["baseline_loss"])  # zero output layer
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(40):
        out = model(batch)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    with torch.no_grad():
        assert float(model(batch)["loss"]) < 0.5 * float(first["baseline_loss"])
    # the first two inputs are phase 0; with phase 1 missing, only copying phase 0 is scored
    missing = {k: v[:2] for k, v in batch.items()} | {"present": torch.tensor([[True, False]] * 2)}
    with torch.no_grad():
        assert float(model(missing)["baseline_loss"]) == 0.0


def test_cross_phase_bad_arguments():
    net = create_model("resunet3d", in_chans=1, out_channels=1, features=[8, 16])
    with pytest.raises(ValueError, match="one channel per phase"):
        CrossPhase3D(net, PHASES, network=True)
    with pytest.raises(ValueError, match="at least two phases"):
        CrossPhase3D(net, ["none"], network=True)
    model = CrossPhase3D(
        create_model("resunet3d", in_chans=1, out_channels=2, features=[8, 16]),
        ["none", "portal"],
        network=True,
    )
    with pytest.raises(ValueError, match="expected image"):
        model({"image": torch.zeros(1, 1, 8, 8, 8), "target": torch.zeros(1, 3, 8, 8, 8),
               "present": torch.ones(1, 3, dtype=torch.bool)})  # fmt: skip


def test_pretrain_cross_phase_network_loads_into_a_segmenter(
    multiphase_store, tiny_ct_store, tmp_path
):
    from umit.config import build_config
    from umit.ssl.pretrain import PretrainConfig, build_method, run
    from umit.train.checkpoint import load_network_weights

    args = [
        "method=cross_phase",
        "scope=network",
        "model=unetr",
        "model_args={encoder: vit3d_test_p8, feature_size: 8}",
        "crop_size=[16,16,16]",
        "train.total_steps=4",
        "train.warmup_steps=1",
        "train.batch_size=2",
        "train.eval_every=2",
        "train.log_every=2",
        "train.progress=false",
        "val_cases=1",
        "val_crops=2",
    ]
    cfg = build_config(PretrainConfig, None, args, data=multiphase_store, out=tmp_path / "xp")
    summary = run(cfg)
    assert summary["method"] == "cross_phase"
    # the hold-out is one whole exam: its three series, none of them trained on
    assert summary["val_cases"] == 3 and summary["train_cases"] == 9
    evals = [json.loads(x) for x in (cfg.out / "metrics.jsonl").read_text().splitlines()]
    evals = [d for d in evals if d["split"] == "eval"]
    assert evals and all(d["val_baseline_loss"] > 0 for d in evals)
    seg = _tiny_unetr(16, out_channels=10)
    report = load_network_weights(seg, cfg.out / "network.pt")
    assert report["skipped_head"] and not report["missing"] and not report["unexpected"]
    with pytest.raises(InputError, match="no subject_id has series of two"):
        run(build_config(PretrainConfig, None, args, data=tiny_ct_store, out=tmp_path / "bad"))
    with pytest.raises(InputError, match="needs a one-channel CT store"):  # e.g. MRI sequences
        build_method(cfg, 3, ["T1", "T2", "FLAIR"], phases=PHASES)
    with pytest.raises(InputError, match="method=genesis or cross_phase"):
        run(build_config(PretrainConfig, None, [*args, "method=mae"], data=multiphase_store,
                         out=tmp_path / "bad2"))  # fmt: skip


def test_pretrain_cross_phase_of_a_whole_resunet_saves_network_and_encoder(
    multiphase_store, tmp_path
):
    """The CNN arm of the phantom study: scope=network with a ResUNet writes both artifacts
    (its encoder alone used to have no model name, and the stage failed after training)."""
    from umit.config import build_config
    from umit.ssl.pretrain import PretrainConfig, run
    from umit.train.checkpoint import load_artifact, load_network_weights

    args = ["method=cross_phase", "scope=network", "model=resunet3d",
            "model_args={features: [4, 8], blocks: 1}", "crop_size=[16,16,16]",
            "train.total_steps=2", "train.warmup_steps=1", "train.batch_size=2",
            "train.eval_every=2", "train.log_every=1", "train.progress=false",
            "val_cases=1", "val_crops=2"]  # fmt: skip
    cfg = build_config(PretrainConfig, None, args, data=multiphase_store, out=tmp_path / "xp")
    summary = run(cfg)
    seg = create_model("resunet3d", features=[4, 8], blocks=1, in_chans=1, out_channels=10)
    report = load_network_weights(seg, summary["network"])
    assert report["skipped_head"] and not report["missing"] and not report["unexpected"]
    enc = load_artifact(summary["encoder"])
    assert enc["kind"] == "encoder" and enc["model_name"] == "resunet3d_encoder"
    rebuilt = create_model(enc["model_name"], **enc["model_args"])
    rebuilt.load_state_dict(enc["state_dict"])
    torch.testing.assert_close(rebuilt.state_dict(), seg.encoder.state_dict())


def test_two_ingests_of_the_same_exams_pretrain_bit_identically(multiphase_store, tmp_path):
    """Each ingest draws its own key for the subject_id hash; the hold-out, the data order and
    so the weights must not depend on it."""
    from umit.config import build_config
    from umit.ingest.run import IngestConfig
    from umit.ingest.run import run as ingest
    from umit.preprocess.run import PreprocessConfig
    from umit.preprocess.run import run as preprocess
    from umit.ssl.pretrain import PretrainConfig, run

    src = multiphase_store.parent / "src"
    ingest(IngestConfig(src=src, out=tmp_path / "raw"), progress=False)
    preprocess(
        PreprocessConfig(
            raw=tmp_path / "raw",
            out=tmp_path / "prep",
            workers=1,
            plan_file=multiphase_store / "plan.json",
        )
    )
    a, b = Store(multiphase_store), Store(tmp_path / "prep")
    case = "phantom_ct_0000_none"
    assert a.index[case]["subject_id"] != b.index[case]["subject_id"]  # another key
    assert list(phase_groups(a, a.case_ids)[1].values()) == list(
        phase_groups(b, b.case_ids)[1].values()
    )
    args = [
        "method=cross_phase",
        "model=vit3d_test_p8",
        "cross_phase.decoder_dim=8",
        "crop_size=[16,16,16]",
        "train.total_steps=2",
        "train.warmup_steps=1",
        "train.batch_size=2",
        "train.progress=false",
        "val_cases=1",
        "val_crops=1",
    ]
    weights = []
    for store, out in ((multiphase_store, tmp_path / "a"), (tmp_path / "prep", tmp_path / "b")):
        summary = run(build_config(PretrainConfig, None, args, data=store, out=out))
        weights.append(torch.load(out / "encoder.pt", weights_only=True)["state_dict"])
    assert summary["val_cases"] == 3
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def _two_phase_blobs(n: int = 4, size: int = 16, seed: int = 0) -> dict[str, torch.Tensor]:
    """Exams of random blobs (positions tell apart) whose 'organs' change brightness between two
    phases; the input of exam i is phase i % 2."""
    g = torch.Generator().manual_seed(seed)
    base = (torch.rand(n, 1, size, size, size, generator=g) > 0.7).float()
    base = torch.nn.functional.avg_pool3d(base, 3, 1, 1)  # smooth blobs
    organ = base > 0.4
    target = torch.cat([torch.where(organ, 0.2, base), torch.where(organ, 1.4, base)], dim=1)
    phase = torch.arange(n) % 2
    image = target[torch.arange(n), phase].unsqueeze(1)
    return {"image": image, "target": target, "present": torch.ones(n, 2, dtype=torch.bool),
            "phase": phase}  # fmt: skip


def test_dense_contrast_equals_a_hand_computed_infonce():
    """The symmetric InfoNCE over shifted sub-crops against loops over positions with NumPy."""
    torch.manual_seed(0)
    model = CrossPhase3D(
        create_model("vit3d_test_p8", img_size=(24, 24, 24), in_chans=1), ["none", "portal"],
        decoder_dim=16, contrast=1.0, temperature=0.3,
    )  # fmt: skip
    a, b = torch.randn(3, 1, 24, 24, 24), torch.randn(3, 1, 24, 24, 24)
    with torch.no_grad():
        info, chance = model.dense_contrast(a, b, torch.Generator().manual_seed(7))
    shift = torch.randint(0, 2, (3, 2, 3), generator=torch.Generator().manual_seed(7)).numpy()
    # by hand: each view cut to 16^3 at offset 0 or 8 per axis; features on a 2^3 grid
    za, zb, world_a, world_b = [], [], [], []
    for i in range(3):
        oa, ob = shift[i, 0] * 8, shift[i, 1] * 8
        ca = a[i : i + 1, :, oa[0] : oa[0] + 16, oa[1] : oa[1] + 16, oa[2] : oa[2] + 16]
        cb = b[i : i + 1, :, ob[0] : ob[0] + 16, ob[1] : ob[1] + 16, ob[2] : ob[2] + 16]
        with torch.no_grad():
            fa = feature_map(model.encoder, ca)[0]  # (C, 2, 2, 2)
            fb = feature_map(model.encoder, cb)[0]
            fa = model.projector(fa.permute(1, 2, 3, 0)).permute(3, 0, 1, 2).numpy()
            fb = model.projector(fb.permute(1, 2, 3, 0)).permute(3, 0, 1, 2).numpy()
        for p in np.ndindex(2, 2, 2):
            za.append(fa[(slice(None), *p)])
            zb.append(fb[(slice(None), *p)])
            world_a.append((i, *(np.array(p) + shift[i, 0])))
            world_b.append((i, *(np.array(p) + shift[i, 1])))
    za = np.array(za, dtype=np.float64)
    zb = np.array(zb, dtype=np.float64)
    za /= np.linalg.norm(za, axis=1, keepdims=True)
    zb /= np.linalg.norm(zb, axis=1, keepdims=True)
    s = za @ zb.T / 0.3
    pairs = [(i, world_b.index(w)) for i, w in enumerate(world_a) if w in world_b]
    assert 3 <= len(pairs) <= 24  # one position at least per exam overlaps

    def nll(m: np.ndarray, rows: list[int], cols: list[int]) -> float:
        return float(
            np.mean([np.log(np.exp(m[r]).sum()) - m[r, c] for r, c in zip(rows, cols, strict=True)])
        )

    rows, cols = [p[0] for p in pairs], [p[1] for p in pairs]
    np.testing.assert_allclose(float(info), 0.5 * (nll(s, rows, cols) + nll(s.T, cols, rows)),
                               rtol=1e-5)  # fmt: skip
    assert float(chance) == pytest.approx(np.log(24))
    with pytest.raises(ValueError, match="two whole feature strides"):
        model.dense_contrast(a[..., :8, :8, :8], b[..., :8, :8, :8])


def test_other_phase_is_present_and_not_the_input():
    present = torch.tensor([[True, True, True], [True, False, True], [False, True, True]] * 50)
    phase = torch.tensor([0, 2, 1] * 50)
    g = torch.Generator().manual_seed(0)
    other = CrossPhase3D.other_phase(present, phase, g)
    assert bool((other != phase).all())
    assert bool(present[torch.arange(len(other)), other].all())
    assert set(other[0::3].tolist()) == {1, 2}  # both choices drawn for the full exam
    assert set(other[1::3].tolist()) == {0} and set(other[2::3].tolist()) == {2}
    again = CrossPhase3D.other_phase(present, phase, torch.Generator().manual_seed(0))
    torch.testing.assert_close(other, again)
    with pytest.raises(ValueError, match="second phase"):
        CrossPhase3D.other_phase(torch.tensor([[True, False]]), torch.tensor([0]))


@pytest.mark.parametrize("network", [True, False])
def test_cross_phase_contrast_learns_to_find_positions_across_phases(network, multiphase_store):
    """On crops of multiphase phantom exams, a position in one phase is found in another."""
    phases, groups = phase_groups(Store(multiphase_store), sorted(Store(multiphase_store).index))
    crops = PhaseGroupCrops(multiphase_store, (24, 24, 24), groups, samples_per_group=1)
    items = [crops[i] for i in range(4)]
    batch = {k: torch.stack([torch.as_tensor(it[k]) for it in items]) for k in items[0]}
    torch.manual_seed(0)
    enc = (
        _tiny_unetr(24, out_channels=3)
        if network
        else create_model("vit3d_test_p8", img_size=(24, 24, 24), in_chans=1)
    )
    model = CrossPhase3D(enc, phases, network=network, decoder_dim=16, contrast=0.5)

    def scored() -> dict[str, torch.Tensor]:
        with torch.no_grad():
            return model(batch, generator=torch.Generator().manual_seed(99))

    first = scored()
    assert set(first) >= {"prediction_loss", "contrast_loss", "contrast_chance"}
    torch.testing.assert_close(
        first["loss"], first["prediction_loss"] + 0.5 * first["contrast_loss"]
    )
    torch.testing.assert_close(first["prediction_loss"], first["baseline_loss"])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for i in range(40):
        out = model(batch, generator=torch.Generator().manual_seed(i))
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    last = scored()
    # 4 exams x 2^3 positions: chance log(32) = 3.47. Untrained features already tell some
    # positions apart by content (1.9-2.1); 40 steps cut that to 0.6-0.9
    assert float(first["contrast_loss"]) < float(first["contrast_chance"])
    assert float(last["contrast_loss"]) < 0.6 * float(first["contrast_loss"])
    # the projector is pretraining-only: not part of what the network artifact saves
    if network:
        assert not any(k.startswith("projector") for k in model.network.state_dict())


def test_cross_phase_contrast_off_builds_and_draws_nothing():
    torch.manual_seed(0)
    model = CrossPhase3D(
        create_model("vit3d_test_p8", img_size=(16, 16, 16), in_chans=1), ["none", "portal"],
        decoder_dim=16,
    )  # fmt: skip
    assert model.projector is None and "contrast" not in model.model_args
    state = torch.random.get_rng_state()
    out = model(_two_phase_blobs())
    assert set(out) == {"loss", "baseline_loss"}
    torch.testing.assert_close(torch.random.get_rng_state(), state)


def test_cross_phase_contrast_bad_arguments():
    def build(**kw):
        return CrossPhase3D(
            create_model("vit3d_test_p8", img_size=(16, 16, 16), in_chans=1),
            ["none", "portal"], decoder_dim=16, **kw,
        )  # fmt: skip

    with pytest.raises(ValueError, match="contrast must be a weight"):
        build(contrast=-0.1)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        build(contrast=1.0, temperature=0.0)
    batch = {k: v for k, v in _two_phase_blobs().items() if k != "phase"}
    with pytest.raises(ValueError, match="needs the batch's input 'phase'"):
        build(contrast=1.0)(batch)
    with pytest.raises(ValueError, match="built with contrast > 0"):
        build().dense_contrast(batch["image"], batch["image"])


def test_pretrain_cross_phase_with_contrast_logs_it_and_keeps_the_network_loadable(
    multiphase_store, tmp_path
):
    from umit.config import build_config
    from umit.ssl.pretrain import PretrainConfig, run
    from umit.train.checkpoint import load_network_weights

    args = ["method=cross_phase", "scope=network", "model=unetr",
            "model_args={encoder: vit3d_test_p8, feature_size: 8}", "crop_size=[24,24,24]",
            "cross_phase.contrast=0.1", "train.total_steps=4", "train.warmup_steps=1",
            "train.batch_size=2", "train.eval_every=2", "train.log_every=2",
            "train.progress=false", "val_cases=1", "val_crops=2"]  # fmt: skip
    cfg = build_config(PretrainConfig, None, args, data=multiphase_store, out=tmp_path / "xp")
    summary = run(cfg)
    records = [json.loads(x) for x in (cfg.out / "metrics.jsonl").read_text().splitlines()]
    train = [d for d in records if d["split"] == "train"]
    evals = [d for d in records if d["split"] == "eval"]
    assert train and all("contrast_loss" in d and "prediction_loss" in d for d in train)
    # validation scores one crop at a time: chance is log(2^3 positions). It compares the
    # prediction alone (not prediction + 0.1 x contrast) with the copy baseline
    assert evals and all(
        d["val_contrast_chance"] == pytest.approx(np.log(8))
        and d["val_loss"] < 0.1 * d["val_contrast_loss"]
        for d in evals
    )
    seg = _tiny_unetr(24, out_channels=10)
    report = load_network_weights(seg, summary["network"])
    assert report["skipped_head"] and not report["missing"] and not report["unexpected"]
    with pytest.raises(
        InputError, match="cross_phase.contrast: Input should be greater than or equal to 0"
    ):
        build_config(PretrainConfig, None, [*args, "cross_phase.contrast=-1"],
                     data=multiphase_store, out=tmp_path / "bad")  # fmt: skip
