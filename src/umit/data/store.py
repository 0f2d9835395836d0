"""The preprocessed store: one Zarr v3 group per case, written atomically, read chunk by chunk.

Layout of a PREP folder::

    PREP/plan.json                 the plan (spacing, orientation, intensity scheme per channel)
    PREP/config.yaml               the resolved PreprocessConfig
    PREP/fingerprint.json          the dataset fingerprint (per-case spacing/shape, intensity stats)
    PREP/index.json                finished cases: shape, spacing, label presence, split, subgroups
    PREP/failures.json             cases that failed, with the reason
    PREP/store.zarr/               Zarr v3 root group
        cases/<case_id>/           one group per case; attributes below, "complete": true last
            image                  (C, X, Y, Z) plan.image_dtype, chunks (1, n, n, n), compressed
            label                  (X, Y, Z) uint8, chunks (n, n, n); only for labeled cases
            locations/<class>      (M, 3) int32 voxel coordinates of class <class> (M <= 10k)

A case is written into ``cases/.tmp-<case_id>-<random>`` and renamed into place when complete, so a
``kill -9`` leaves either a complete case group or a ``.tmp-*`` folder that the next run deletes.
The index can always be rebuilt from the case attributes (:func:`scan_complete`).

PREP may also be an object-store URL, ``s3://bucket/prefix`` (Zarr v3 over fsspec/s3fs;
credentials and endpoint from the usual AWS settings: ``AWS_ACCESS_KEY_ID``,
``AWS_ENDPOINT_URL``, ``~/.aws``...). An object store cannot rename, so there a case is written in
place and its group's ``zarr.json`` with ``complete: true`` is the last object written: readers
and reruns see a case either complete or not at all (an incomplete one is rewritten). Readers
may keep a local copy of the chunks they fetched (``Store(..., chunk_cache=DIR)``).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import zarr
import zarr.codecs as zc
from zarr.abc.store import ByteRequest
from zarr.core.buffer import Buffer, BufferPrototype
from zarr.storage import FsspecStore, LocalStore, WrapperStore

from umit.data.meta import ImageMeta
from umit.data.plan import PLAN_NAME, Plan
from umit.errors import InputError
from umit.utils.fileio import TMP_PREFIX, atomic_write_bytes, remove_stale_temps

STORE_NAME = "store.zarr"
CASES_GROUP = "cases"
INDEX_NAME = "index.json"
FAILURES_NAME = "failures.json"
FINGERPRINT_NAME = "fingerprint.json"
CASE_FORMAT_VERSION = 1
LOCATION_CHUNK = 1024
# Catalog attributes copied into the case attributes and the index (subgroups for bias analysis).
CATALOG_KEYS = (
    "split",
    "target",
    "subject_id",
    "sex",
    "age_band",
    "site",
    "manufacturer",
    "model",
    "contrast",
    "modality",
    "body_part",
)


def check_case_id(case_id: str) -> str:
    """Case ids become folder names: refuse empty ones, path separators and leading dots."""
    if (
        not case_id
        or "/" in case_id
        or "\\" in case_id
        or case_id.startswith(".")
        or case_id == "zarr.json"
    ):
        raise InputError(None, f"case id {case_id!r} cannot be a store group name")
    return case_id


def is_url(location: object) -> bool:
    """A ``scheme://`` location (an object store), not a local path."""
    return isinstance(location, str) and "://" in location


class PrepDir:
    """Where a PREP lives: a local folder or an fsspec URL (``s3://bucket/prefix``).

    The few operations the preprocess run and the reader need, the same on both: read and write
    small JSON/YAML files (atomically: temp + rename locally, one PUT on an object store), list
    case groups, open a Zarr store. Picklable (the file-system handle is made again on use).
    """

    def __init__(self, location: str | Path | PrepDir):
        if isinstance(location, PrepDir):
            location = location.location
        self.remote = is_url(location)
        self.location: str | Path = str(location).rstrip("/") if self.remote else Path(location)
        self._fs: Any = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_fs": None}

    def __str__(self) -> str:
        return str(self.location)

    def __repr__(self) -> str:
        return f"PrepDir({str(self.location)!r})"

    @property
    def fs(self) -> Any:
        if self._fs is None:
            import fsspec

            self._fs, self._root = fsspec.core.url_to_fs(self.location)
        return self._fs

    def _key(self, *parts: str) -> str:
        self.fs  # noqa: B018 - sets _root
        return "/".join([self._root, *parts])

    def name(self, *parts: str) -> str | Path:
        """How messages name ``parts`` under PREP."""
        if self.remote:
            return "/".join([str(self.location), *parts])
        return self.location.joinpath(*parts)

    def path(self, *parts: str) -> Path:
        """A local path under PREP (local PREP only)."""
        assert not self.remote, "object-store PREP has no local paths"
        return self.location.joinpath(*parts)

    def mkdir(self) -> None:
        if not self.remote:
            self.location.mkdir(parents=True, exist_ok=True)
            return
        bucket = self._key().split("/")[0]
        try:
            self.fs.ls(bucket, detail=False)
        except (FileNotFoundError, PermissionError, OSError) as exc:
            raise InputError(
                str(self.location),
                f"bucket {bucket!r} cannot be listed ({type(exc).__name__}: {exc})",
            ) from None

    def read_bytes(self, *parts: str) -> bytes | None:
        """The file's bytes, or None when it does not exist."""
        try:
            if self.remote:
                return self.fs.cat_file(self._key(*parts))
            return self.path(*parts).read_bytes()
        except FileNotFoundError:
            return None

    def read_text(self, *parts: str) -> str | None:
        data = self.read_bytes(*parts)
        return None if data is None else data.decode("utf-8")

    def write_bytes(self, data: bytes, *parts: str) -> None:
        """Write atomically: a reader sees the old or the new file, never half of it."""
        if self.remote:
            self.fs.pipe_file(self._key(*parts), data)  # one PUT: all or nothing
        else:
            atomic_write_bytes(self.path(*parts), data)

    def write_text(self, text: str, *parts: str) -> None:
        self.write_bytes(text.encode("utf-8"), *parts)

    def exists(self, *parts: str) -> bool:
        if self.remote:
            return self.fs.exists(self._key(*parts))
        return self.path(*parts).exists()

    def remove(self, *parts: str) -> None:
        """Delete a file or a folder/prefix (recursively), if present."""
        if self.remote:
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm(self._key(*parts), recursive=True)
            self.fs.invalidate_cache()
            return
        path = self.path(*parts)
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)

    def children(self, *parts: str) -> list[str]:
        """Names of the sub-folders (prefixes) of ``parts``, sorted; [] when absent."""
        if self.remote:
            self.fs.invalidate_cache()  # other writers may have added cases
            try:
                entries = self.fs.ls(self._key(*parts), detail=True)
            except FileNotFoundError:
                return []
            return sorted(e["name"].rsplit("/", 1)[-1] for e in entries if e["type"] == "directory")
        folder = self.path(*parts)
        if not folder.is_dir():
            return []
        return sorted(c.name for c in folder.iterdir() if c.is_dir())

    def zarr_store(self, *parts: str, read_only: bool = False) -> Any:
        """A Zarr store rooted at ``parts`` under PREP."""
        if self.remote:
            url = "/".join([str(self.location), *parts])
            return FsspecStore.from_url(url, read_only=read_only)
        return LocalStore(str(self.path(*parts)), read_only=read_only)


class ChunkCacheStore(WrapperStore):
    """Read-through local copy of what a remote store returns: each object fetched once.

    For reading a finished store only (chunks and metadata are not rewritten while it is read).
    Files go under ``cache_dir`` by key, written atomically, so several reader processes can
    share one cache folder.
    """

    def __init__(self, store: Any, cache_dir: str | Path):
        super().__init__(store)
        self.cache_dir = Path(cache_dir)

    def _with_store(self, store: Any) -> ChunkCacheStore:
        return type(self)(store, self.cache_dir)

    async def get(
        self, key: str, prototype: BufferPrototype, byte_range: ByteRequest | None = None
    ) -> Buffer | None:
        if byte_range is not None:
            return await self._store.get(key, prototype, byte_range)
        local = self.cache_dir / key
        try:
            return prototype.buffer.from_bytes(local.read_bytes())
        except FileNotFoundError:
            pass
        value = await self._store.get(key, prototype)
        if value is not None:
            atomic_write_bytes(local, value.to_bytes())
        return value


def store_root(prep_dir: str | Path) -> Path:
    return Path(prep_dir) / STORE_NAME


def cases_dir(prep_dir: str | Path) -> Path:
    return store_root(prep_dir) / CASES_GROUP


def compressors_for(plan: Plan) -> Any:
    level = plan.compression_level
    if plan.compression == "blosc-zstd":
        return [zc.BloscCodec(cname="zstd", clevel=level, shuffle="shuffle")]
    if plan.compression == "blosc-lz4":
        return [zc.BloscCodec(cname="lz4", clevel=level, shuffle="shuffle")]
    if plan.compression == "zstd":
        return [zc.ZstdCodec(level=level)]
    return None


def init_store(prep_dir: str | Path | PrepDir) -> str | Path:
    """Create ``store.zarr`` (root + ``cases`` group) if needed; delete stale ``.tmp-*`` case groups."""
    prep = PrepDir(prep_dir)
    if not prep.exists(STORE_NAME, "zarr.json"):
        group = zarr.open_group(prep.zarr_store(STORE_NAME), mode="a", zarr_format=3)
        group.update_attributes({"format": "umit-prep", "format_version": CASE_FORMAT_VERSION})
    if not prep.exists(STORE_NAME, CASES_GROUP, "zarr.json"):
        zarr.open_group(prep.zarr_store(STORE_NAME, CASES_GROUP), mode="a", zarr_format=3)
    if not prep.remote:
        remove_stale_temps(prep.path(STORE_NAME, CASES_GROUP), recursive=False)
    return prep.name(STORE_NAME)


def read_case_attrs(prep_dir: str | Path | PrepDir, case_id: str) -> dict[str, Any] | None:
    """Attributes of a case group straight from its ``zarr.json`` (None if absent or unreadable)."""
    try:
        text = PrepDir(prep_dir).read_text(STORE_NAME, CASES_GROUP, case_id, "zarr.json")
        return None if text is None else json.loads(text).get("attributes", {})
    except (OSError, ValueError):
        return None


def is_complete(attrs: dict[str, Any] | None) -> bool:
    return bool(attrs) and attrs.get("complete") is True


def index_entry(attrs: dict[str, Any]) -> dict[str, Any]:
    """The index row of a case, derived from its store attributes."""
    entry = {
        "shape": attrs["shape"],
        "spacing": attrs["spacing"],
        "channels": attrs["channel_names"],
        "has_label": attrs["has_label"],
        "label_classes": attrs.get("label_classes", []),
        "class_locations": attrs.get("class_locations", {}),
        "processed_at": attrs.get("processed_at", ""),
    }
    entry.update(attrs.get("catalog", {}))
    return entry


def scan_complete(
    prep_dir: str | Path | PrepDir, plan_hash: str | None = None
) -> dict[str, dict[str, Any]]:
    """Index rows of every complete case group in the store (the index is derived, never primary).

    With ``plan_hash``, only groups written with that plan (``Plan.processing_hash()``) count.
    """
    prep = PrepDir(prep_dir)
    out: dict[str, dict[str, Any]] = {}
    for name in prep.children(STORE_NAME, CASES_GROUP):
        if not name.startswith(TMP_PREFIX):
            attrs = read_case_attrs(prep, name)
            if is_complete(attrs) and (plan_hash is None or attrs.get("plan_hash") == plan_hash):
                out[name] = index_entry(attrs)
    return out


def write_case(
    prep_dir: str | Path,
    case_id: str,
    plan: Plan,
    image: np.ndarray,
    label: np.ndarray | None,
    locations: dict[int, np.ndarray],
    attrs: dict[str, Any],
) -> Path:
    """Write one case as ``cases/<case_id>`` atomically (temp group, then rename).

    Args:
        prep_dir: The PREP folder (:func:`init_store` must have run).
        case_id: The case id (a folder name).
        plan: Gives chunking, compression and dtypes.
        image: (C, X, Y, Z) already in ``plan.image_dtype``.
        label: (X, Y, Z) uint8, or None.
        locations: class -> (M, 3) int voxel coordinates.
        attrs: Case attributes; ``complete: true`` is added last.
    """

    check_case_id(case_id)
    prep = PrepDir(prep_dir)
    if prep.remote:
        return _write_case_in_place(prep, case_id, plan, image, label, locations, attrs)
    folder = cases_dir(prep.location)
    final = folder / case_id
    tmp = folder / f"{TMP_PREFIX}{case_id}-{uuid.uuid4().hex[:8]}"
    try:
        group = zarr.open_group(str(tmp), mode="w", zarr_format=3)
        _write_arrays(group, plan, image, label, locations)
        group.update_attributes({**attrs, "complete": True})  # one metadata write, after the arrays
        if final.exists():
            existing = read_case_attrs(prep, case_id)
            if is_complete(existing) and existing.get("plan_hash") == attrs.get("plan_hash"):
                return final  # another writer finished it first; keep the existing one
            shutil.rmtree(final)  # incomplete, or written with another plan
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def _write_case_in_place(
    prep: PrepDir,
    case_id: str,
    plan: Plan,
    image: np.ndarray,
    label: np.ndarray | None,
    locations: dict[int, np.ndarray],
    attrs: dict[str, Any],
) -> str | Path:
    """Object store: no rename, so the group's ``zarr.json`` saying ``complete`` comes last."""
    existing = read_case_attrs(prep, case_id)
    if is_complete(existing) and existing.get("plan_hash") == attrs.get("plan_hash"):
        return prep.name(STORE_NAME, CASES_GROUP, case_id)  # another writer finished it first
    prep.remove(STORE_NAME, CASES_GROUP, case_id)  # incomplete, or written with another plan
    store = prep.zarr_store(STORE_NAME, CASES_GROUP, case_id)
    group = zarr.open_group(store, mode="w", zarr_format=3)  # zarr.json without "complete"
    _write_arrays(group, plan, image, label, locations)
    group.update_attributes({**attrs, "complete": True})  # the last object written
    return prep.name(STORE_NAME, CASES_GROUP, case_id)


def _write_arrays(
    group: Any,
    plan: Plan,
    image: np.ndarray,
    label: np.ndarray | None,
    locations: dict[int, np.ndarray],
) -> None:
    n = plan.chunk_size
    compressors = compressors_for(plan)
    arr = group.create_array(
        "image",
        shape=image.shape,
        dtype=image.dtype,
        chunks=(1, n, n, n),
        compressors=compressors,
        fill_value=0,
    )
    arr[...] = image
    if label is not None:
        arr = group.create_array(
            "label",
            shape=label.shape,
            dtype=label.dtype,
            chunks=(n, n, n),
            compressors=compressors,
            fill_value=0,
        )
        arr[...] = label
    for cls, coords in sorted(locations.items()):
        if len(coords):
            coords = np.ascontiguousarray(coords, dtype=np.int32)
            arr = group.create_array(
                f"locations/{int(cls)}",
                shape=coords.shape,
                dtype=np.int32,
                chunks=(min(LOCATION_CHUNK, len(coords)), 3),
                compressors=compressors,
                fill_value=0,
            )
            arr[...] = coords


# -- reading -------------------------------------------------------------------------------------


class StoreCase:
    """One preprocessed case: geometry from its attributes, voxels read lazily by slice.

    Attributes:
        case_id: The case id.
        attrs: All case attributes (geometry, original geometry, crop bbox, pad values, catalog).
    """

    def __init__(self, zstore: Any, case_id: str, source: str):
        self.case_id = case_id
        self._source = source
        try:
            self._group = zarr.open_group(
                store=zstore, path=f"{CASES_GROUP}/{case_id}", mode="r", zarr_format=3
            )
        except (FileNotFoundError, KeyError, ValueError) as exc:
            raise InputError(
                source, f"case group is missing or unreadable ({type(exc).__name__}: {exc})"
            ) from exc
        self.attrs: dict[str, Any] = self._group.attrs.asdict()
        if not is_complete(self.attrs):
            raise InputError(
                source, "case group is incomplete (interrupted write); rerun `umit preprocess`"
            )
        self._image = None
        self._label = None
        self._locations: dict[int, np.ndarray] = {}

    def __repr__(self) -> str:
        return f"StoreCase({self.case_id!r}, shape={self.shape}, spacing={self.spacing})"

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """(C, X, Y, Z)."""
        return tuple(self.attrs["shape"])

    @property
    def spatial_shape(self) -> tuple[int, int, int]:
        return tuple(self.attrs["shape"][1:])

    @property
    def affine(self) -> np.ndarray:
        """Voxel index -> RAS mm of the stored grid (after crop and resampling)."""
        return np.asarray(self.attrs["affine"], dtype=np.float64)

    @property
    def spacing(self) -> tuple[float, float, float]:
        return tuple(self.attrs["spacing"])

    @property
    def channel_names(self) -> list[str]:
        return list(self.attrs["channel_names"])

    @property
    def pad_values(self) -> list[float]:
        """Per channel: the normalized value of air/background, for padding crops."""
        return list(self.attrs["pad_values"])

    @property
    def has_label(self) -> bool:
        return bool(self.attrs["has_label"])

    @property
    def label_classes(self) -> list[int]:
        return [int(c) for c in self.attrs.get("class_locations", {})]

    @property
    def meta(self) -> ImageMeta:
        catalog = dict(self.attrs.get("catalog", {}))
        return ImageMeta(
            affine=self.affine,
            source=self._source,
            modality=catalog.get("modality") or "unknown",
            channel_names=tuple(self.channel_names),
            extra=catalog,
        )

    def _array(self, name: str) -> Any:
        try:
            return self._group[name]
        except KeyError as exc:
            raise InputError(self._source, f"no {name!r} array in this case group") from exc

    def read(self, slices: tuple = (...,)) -> np.ndarray:
        """Image voxels ``image[slices]`` of the (C, X, Y, Z) array; only touched chunks are read."""
        if self._image is None:
            self._image = self._array("image")
        return self._image[slices]

    def read_label(self, slices: tuple = (...,)) -> np.ndarray:
        """Label voxels ``label[slices]`` of the (X, Y, Z) array."""
        if not self.has_label:
            raise InputError(self._source, "this case has no label")
        if self._label is None:
            self._label = self._array("label")
        return self._label[slices]

    def class_locations(self, cls: int) -> np.ndarray:
        """(M, 3) cached voxel coordinates of label class ``cls`` (empty if absent).

        Read once and kept with this object (at most ``max_class_locations`` * 12 bytes).
        """
        cls = int(cls)
        if cls not in self._locations:
            if str(cls) not in self.attrs.get("class_locations", {}):
                return np.zeros((0, 3), dtype=np.int32)
            self._locations[cls] = self._array(f"locations/{cls}")[...]
        return self._locations[cls]

    def location(self, cls: int, row: int) -> np.ndarray:
        """One cached coordinate (3,) of class ``cls``."""
        return self.class_locations(cls)[int(row)]


class Store:
    """Reader of a PREP folder's Zarr store; picklable (handles are reopened after fork/spawn).

    Args:
        prep_dir: The PREP folder written by ``umit preprocess``, or its ``s3://bucket/prefix``.
        cache_size: How many opened cases to keep (each holds only metadata, no voxels).
        chunk_cache: A local folder keeping a copy of every object read from a remote PREP
            (chunks are fetched once; several readers may share the folder). None: no copy.
    """

    def __init__(
        self, prep_dir: str | Path, cache_size: int = 256, chunk_cache: str | Path | None = None
    ):
        self.prep = PrepDir(prep_dir)
        self.prep_dir = self.prep.location
        self.chunk_cache = Path(chunk_cache) if chunk_cache is not None else None
        if not self.prep.exists(STORE_NAME, "zarr.json"):
            raise InputError(
                self.prep_dir,
                f"no {STORE_NAME} here; run `umit preprocess RAW --out {self.prep_dir}`",
            )
        index_path = self.prep.name(INDEX_NAME)
        text = self.prep.read_text(INDEX_NAME)
        if text is None:
            raise InputError(
                index_path, "index is missing: the preprocess run did not finish; rerun it"
            )
        try:
            index = json.loads(text)
        except ValueError as exc:
            raise InputError(index_path, f"index is not valid JSON ({exc})") from exc
        self.index: dict[str, dict[str, Any]] = index.get("cases", {})
        self.cache_size = cache_size
        self._zstore = None
        self._pid = None
        self._cases: OrderedDict[str, StoreCase] = OrderedDict()
        self._plan: Plan | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.update(_zstore=None, _pid=None, _cases=OrderedDict())
        return state

    @property
    def plan(self) -> Plan:
        if self._plan is None:
            if self.prep.remote:
                text = self.prep.read_text(PLAN_NAME)
                if text is None:
                    raise InputError(self.prep.name(PLAN_NAME), "plan file not found")
                self._plan = Plan.from_json(text, self.prep.name(PLAN_NAME))
            else:
                self._plan = Plan.load(self.prep.path(PLAN_NAME))
        return self._plan

    @property
    def case_ids(self) -> list[str]:
        return sorted(self.index)

    def __len__(self) -> int:
        return len(self.index)

    def __contains__(self, case_id: object) -> bool:
        return case_id in self.index

    def _open(self) -> Any:
        if self._zstore is None or self._pid != os.getpid():
            zstore = self.prep.zarr_store(STORE_NAME, read_only=True)
            if self.chunk_cache is not None:
                zstore = ChunkCacheStore(zstore, self.chunk_cache)
            self._zstore = zstore
            self._pid = os.getpid()
            self._cases.clear()
        return self._zstore

    def case(self, case_id: str) -> StoreCase:
        """The case ``case_id`` (an InputError naming the store if it is not a finished case)."""
        if case_id not in self.index:
            raise InputError(
                self.prep.name(STORE_NAME, CASES_GROUP, str(case_id)),
                "case is not in the store index",
            )
        zstore = self._open()
        case = self._cases.get(case_id)
        if case is None:
            case = StoreCase(zstore, case_id, str(self.prep.name(STORE_NAME, CASES_GROUP, case_id)))
            self._cases[case_id] = case
            while len(self._cases) > self.cache_size:
                self._cases.popitem(last=False)
        else:
            self._cases.move_to_end(case_id)
        return case
