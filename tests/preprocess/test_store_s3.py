"""PREP on an object store: ``umit preprocess ... --out s3://bucket/prefix`` and training reads
from it (with and without a local chunk cache), against moto's S3 server on 127.0.0.1."""

from __future__ import annotations

import json

import numpy as np
import pytest

from umit.data.dataset import StoreCropDataset
from umit.data.store import PrepDir, Store
from umit.errors import InputError
from umit.preprocess.run import PreprocessConfig
from umit.preprocess.run import run as preprocess

pytestmark = pytest.mark.s3


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    from umit.data.phantoms import write_phantom_collection
    from umit.ingest.run import IngestConfig
    from umit.ingest.run import run as ingest

    root = tmp_path_factory.mktemp("s3_src")
    write_phantom_collection(root / "src", n=3, modality="ct", seed=9, shape=(24, 24, 16))
    ingest(IngestConfig(src=root / "src", out=root / "raw"), progress=False)
    return root / "raw"


def _same_cases(a: Store, b: Store) -> None:
    assert a.case_ids == b.case_ids and len(a) == 3
    for cid in a.case_ids:
        ca, cb = a.case(cid), b.case(cid)
        assert np.array_equal(ca.read(), cb.read())
        assert np.array_equal(ca.read_label(), cb.read_label())
        assert np.array_equal(ca.affine, cb.affine)
        for cls in ca.label_classes:
            assert np.array_equal(ca.class_locations(cls), cb.class_locations(cls))


def _index(store: Store) -> dict:
    return {c: {k: v for k, v in r.items() if k != "processed_at"} for c, r in store.index.items()}


def test_preprocess_to_s3_equals_local_and_resumes(raw, tmp_path, s3_bucket):
    url = f"{s3_bucket}/prep/ct"
    local = preprocess(PreprocessConfig(raw=raw, out=tmp_path / "prep", workers=1))
    from umit.cli.main import main

    assert main(["preprocess", str(raw), "--out", url, "workers=1"]) == 0  # as the README says
    assert local.done == 3
    ls, rs = Store(tmp_path / "prep"), Store(url)
    _same_cases(ls, rs)
    assert _index(ls) == _index(rs)
    assert rs.plan.processing_hash() == ls.plan.processing_hash()
    prep = PrepDir(url)
    assert "out: s3://" in prep.read_text("config.yaml")
    # a case whose write was cut short (no "complete" yet) is redone; the others are kept
    cid = rs.case_ids[1]
    key = ("store.zarr", "cases", cid, "zarr.json")
    meta = json.loads(prep.read_text(*key))
    del meta["attributes"]["complete"]
    prep.write_text(json.dumps(meta), *key)
    again = preprocess(PreprocessConfig(raw=raw, out=url, workers=1))
    assert (again.done, again.skipped) == (1, 2)
    _same_cases(ls, Store(url))


def test_reads_through_a_local_chunk_cache(raw, tmp_path, s3_bucket):
    url = f"{s3_bucket}/prep"
    preprocess(PreprocessConfig(raw=raw, out=url, workers=1))
    cache = tmp_path / "cache"
    ds_cached = StoreCropDataset(url, 16, seed=3, chunk_cache=cache)
    ds_plain = StoreCropDataset(url, 16, seed=3)
    first = [ds_cached[i] for i in range(len(ds_cached))]
    for a, b in zip(first, (ds_plain[i] for i in range(len(ds_plain))), strict=True):
        assert a["case_id"] == b["case_id"]
        assert np.array_equal(a["image"], b["image"]) and np.array_equal(a["label"], b["label"])
    cached = [p for p in cache.rglob("*") if p.is_file()]
    assert any("/c/" in str(p) for p in cached)  # chunk files, not only metadata
    # `umit pretrain data=s3://...` keeps the URL; its crops come through the same cache
    from umit.ssl.pretrain import PretrainConfig, training_data

    cfg = PretrainConfig(data=url, crop_size=(16, 16, 16), chunk_cache=str(cache))
    assert cfg.data == url
    assert tuple(training_data(cfg, Store(url).case_ids)[0]["image"].shape) == (1, 16, 16, 16)
    from umit.finetune.run import FinetuneConfig

    assert FinetuneConfig(data=url, chunk_cache=str(cache)).data == url  # not folded to s3:/
    # the object store's copy of the chunks goes away: cached crops still read the same
    fs = PrepDir(url).fs
    for path in fs.find(url.removeprefix("s3://") + "/store.zarr"):
        if "/c/" in path:
            fs.rm(path)
    ds_again = StoreCropDataset(url, 16, seed=3, chunk_cache=cache)
    for i, a in enumerate(first):
        assert np.array_equal(ds_again[i]["image"], a["image"])
    assert not np.array_equal(StoreCropDataset(url, 16, seed=3)[0]["image"], first[0]["image"])


def test_missing_bucket_and_missing_store_are_clear_errors(raw, s3, s3_bucket):
    with pytest.raises(InputError, match="bucket 'no-such-bucket-umit' cannot be listed"):
        preprocess(PreprocessConfig(raw=raw, out="s3://no-such-bucket-umit/prep", workers=1))
    with pytest.raises(InputError, match=r"no store.zarr here"):
        Store(f"{s3_bucket}/nothing")
