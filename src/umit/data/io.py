"""Read and write 3D/4D medical images as ``(array, ImageMeta)``: NIfTI, NRRD, MetaImage, DICOM.

Every reader returns the voxels in their stored dtype, indexed ``(i, j, k)`` (or ``(i, j, k, t)`` /
``(i, j, k, c)``), with an :class:`~umit.data.meta.ImageMeta` whose affine maps voxel indices to
RAS+ millimetres. Every writer restores that geometry, writes atomically (temp name, then rename)
and never stores identifiers.

Conventions of the formats:

* NIfTI stores the affine itself (RAS+); we use the sform when its code is > 0, else the qform,
  exactly as ``nibabel``'s ``img.affine``. NIfTI-1 stores the sform as float32, so an arbitrary
  float64 affine survives a write/read to about 1e-5 mm; a read -> write -> read is exact.
* ITK formats (NRRD, MetaImage) store LPS direction, spacing and origin; SimpleITK hands arrays
  over as ``(z, y, x)``, which we transpose to ``(i, j, k)`` = ``(x, y, z)``.
* A directory (a DICOM series) is refused here: :func:`umit.ingest.read_volume` reads it, so
  that nothing below the ingest stage imports DICOM parsing.
"""

from __future__ import annotations

import bz2
import gzip
import logging
import re
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk
from nibabel.orientations import (
    apply_orientation,
    axcodes2ornt,
    inv_ornt_aff,
    io_orientation,
    ornt_transform,
)

from umit.data.meta import ImageMeta, affine_from_lps, lps_from_affine
from umit.errors import InputError
from umit.utils.fileio import TMP_PREFIX, atomic_path

logger = logging.getLogger(__name__)

NIFTI_SUFFIXES = (".nii", ".nii.gz")
ITK_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd")
IMAGE_SUFFIXES: tuple[str, ...] = NIFTI_SUFFIXES + ITK_SUFFIXES
"""File suffixes :func:`read_image` understands (a directory is read as a DICOM series)."""

# Formats whose voxels live in one file, so that an atomic rename publishes the whole image.
WRITE_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".mha")

# MetaImage "Modality" values (MET_MOD_*) -> our modality names.
_MET_MODALITY = {"MET_MOD_CT": "CT", "MET_MOD_MR": "MR", "MET_MOD_PET": "PT", "MET_MOD_NM": "NM"}


def image_suffix(path: str | Path) -> str | None:
    """The supported suffix of ``path`` (lower case, ``.nii.gz`` counts as one), or None."""
    name = Path(path).name.lower()
    for suffix in sorted(IMAGE_SUFFIXES, key=len, reverse=True):
        if name.endswith(suffix) and len(name) > len(suffix):
            return suffix
    return None


def is_image_file(path: str | Path) -> bool:
    """True for a file name :func:`read_image` can read (by suffix; ``.tmp-*`` names excluded).

    Only the name is inspected, plus a check that the path is not a directory; the file need not
    exist. DICOM folders are not "image files": pass them to :func:`read_image` directly.
    """
    path = Path(path)
    if path.name.startswith(TMP_PREFIX) or image_suffix(path) is None:
        return False
    return not path.is_dir()


def check_finite(array: np.ndarray, source: str | Path | None) -> None:
    """Raise :class:`InputError` if a floating-point ``array`` holds NaN or Inf voxels.

    Integer arrays cannot hold them and pass unchecked. Callers that want to repair such images
    (e.g. ``np.nan_to_num``) catch the error and decide.
    """
    array = np.asarray(array)
    if not np.issubdtype(array.dtype, np.floating) and not np.issubdtype(
        array.dtype, np.complexfloating
    ):
        return
    if np.isfinite(array).all():
        return
    n_nan = int(np.isnan(array).sum())
    n_inf = int(np.isinf(array).sum())
    raise InputError(
        source,
        f"image has non-finite voxels: {n_nan} NaN and {n_inf} Inf of {array.size} "
        "(replace them, e.g. with numpy.nan_to_num, before use)",
    )


def _check_volume(array: np.ndarray, source: str | Path) -> None:
    """Reject arrays that are not 3D volumes (optionally with a 4th time/channel axis)."""
    if array.ndim < 3 or min(array.shape[:3]) == 1:
        raise InputError(
            source, f"2D image, expected a 3D volume (array shape {tuple(array.shape)})"
        )
    if array.ndim > 4:
        raise InputError(
            source,
            f"{array.ndim}D array of shape {tuple(array.shape)}, expected a 3D volume "
            "(i, j, k) or 4D (i, j, k, t/c)",
        )


def _check_affine(affine: np.ndarray, source: str | Path) -> np.ndarray:
    affine = np.asarray(affine, dtype=np.float64)
    if not np.all(np.isfinite(affine)):
        raise InputError(source, f"non-finite affine (NaN or Inf in the geometry):\n{affine}")
    if abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise InputError(source, f"singular affine (zero voxel size or collinear axes):\n{affine}")
    return affine


# --------------------------------------------------------------------------------------------
# Reading


def read_image(path: str | Path) -> tuple[np.ndarray, ImageMeta]:
    """Read a NIfTI / NRRD / MetaImage file (DICOM folders: :func:`umit.ingest.read_volume`).

    Args:
        path: ``.nii``, ``.nii.gz``, ``.nrrd``, ``.nhdr``, ``.mha``, ``.mhd`` file, or a folder
            (not a folder).

    Returns:
        ``(array, meta)``: the voxels in their stored dtype (float32 when NIfTI scaling applies),
        shaped ``(i, j, k)``, ``(i, j, k, t)`` or ``(i, j, k, c)``; ``meta.affine`` maps voxel
        index to RAS+ mm.

    Raises:
        InputError: missing path, unknown suffix, truncated or corrupt file, 2D image, non-finite
            affine, NaN/Inf voxels, a folder.
    """
    path = Path(path)
    if path.is_dir():
        raise InputError(
            path,
            "is a folder: DICOM series are read by umit.ingest.read_volume "
            "(or converted by `umit ingest`); read_image reads image files",
        )
    if not path.exists():
        raise InputError(path, "no such file or folder")
    suffix = image_suffix(path)
    if suffix is None:
        raise InputError(
            path,
            f"unknown image format (suffix {''.join(path.suffixes) or 'none'!r}); "
            f"expected one of {', '.join(IMAGE_SUFFIXES)} or a DICOM folder",
        )
    if suffix in NIFTI_SUFFIXES:
        array, meta = _read_nifti(path)
    else:
        array, meta = _read_itk(path)
    _check_volume(array, path)
    check_finite(array, path)
    return array, meta


def _read_nifti(path: Path) -> tuple[np.ndarray, ImageMeta]:
    try:
        if path.name.lower().endswith(".gz"):
            img = _load_nifti_gz(path)
        else:
            img = nib.load(str(path), mmap=False)
    except InputError:
        raise
    except Exception as exc:  # nibabel raises many types for bad headers
        raise InputError(path, f"not a readable NIfTI file ({type(exc).__name__}: {exc})") from exc
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise InputError(path, f"not a NIfTI image (nibabel read it as {type(img).__name__})")
    try:
        proxy = img.dataobj
        raw = np.asarray(proxy.get_unscaled())
        slope, inter = float(proxy.slope), float(proxy.inter)
    except Exception as exc:  # truncated gzip stream, short file, ...
        raise InputError(
            path, f"truncated or corrupt NIfTI data ({type(exc).__name__}: {exc})"
        ) from exc
    if slope != 1.0 or inter != 0.0:
        # Scaled storage (e.g. int16 with scl_slope): the real values are slope * raw + inter.
        data = (raw.astype(np.float64) * slope + inter).astype(np.float32)
    elif not raw.dtype.isnative:  # big-endian file: same values and kind, native byte order
        data = raw.astype(raw.dtype.newbyteorder("="))
    else:
        data = raw
    # NIfTI puts a 3D volume with extra singleton axes as (x, y, z, 1) or (x, y, z, 1, c)
    # (vector intent): drop the singleton time axis.
    if data.ndim == 5 and data.shape[3] == 1:
        data = data[:, :, :, 0, :]
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if int(img.header["sform_code"]) <= 0 and int(img.header["qform_code"]) <= 0:
        logger.warning("%s: neither sform nor qform is set; using voxel sizes only", path)
    affine = _check_affine(img.affine, path)
    return data, ImageMeta(affine=affine, source=str(path))


def _load_nifti_gz(path: Path) -> nib.Nifti1Image | nib.Nifti2Image:
    """Decompress the whole file first: the gzip CRC then catches a damaged stream.

    nibabel reads only the bytes it needs and never reaches the gzip trailer, so a corrupted
    deflate stream can decode silently into wrong voxels.
    """
    try:
        raw = gzip.decompress(path.read_bytes())
    except (OSError, EOFError, zlib.error) as exc:
        raise InputError(
            path, f"truncated or corrupt gzip stream ({type(exc).__name__}: {exc})"
        ) from exc
    if len(raw) < 4:
        raise InputError(path, f"truncated NIfTI file ({len(raw)} bytes)")
    sizeof_hdr = {int.from_bytes(raw[:4], "little"), int.from_bytes(raw[:4], "big")}
    klass = nib.Nifti2Image if 540 in sizeof_hdr else nib.Nifti1Image
    return klass.from_bytes(raw)


def _verify_stream(path: Path, offset: int, kind: str) -> None:
    """Decompress ``path`` from ``offset`` to check the stream's checksum; raise if damaged.

    ITK decodes only as many bytes as the image needs (and MetaImage only prints a warning on a
    zlib error), so corrupt compressed NRRD/MetaImage data can otherwise come back as garbage.
    """
    limit = 1 << 24  # bound the (discarded) output of each call
    decomp = bz2.BZ2Decompressor() if kind == "bzip2" else zlib.decompressobj(47)  # gzip|zlib
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            while not decomp.eof and (chunk := f.read(1 << 20)):
                if isinstance(decomp, bz2.BZ2Decompressor):
                    decomp.decompress(chunk, max_length=limit)
                    while not decomp.eof and not decomp.needs_input:
                        decomp.decompress(b"", max_length=limit)
                else:
                    while chunk and not decomp.eof:
                        decomp.decompress(chunk, limit)
                        chunk = decomp.unconsumed_tail
    except (OSError, EOFError, zlib.error) as exc:
        raise InputError(
            path, f"truncated or corrupt compressed voxel data ({type(exc).__name__}: {exc})"
        ) from exc
    if not decomp.eof:
        raise InputError(path, "truncated or corrupt compressed voxel data (the stream ends early)")


def _check_itk_compression(path: Path) -> None:
    """Find the compressed voxel stream of a NRRD/MetaImage file (attached or detached)."""
    with open(path, "rb") as f:
        head = f.read(1 << 16)
    if head.startswith(b"NRRD"):
        blank = re.search(rb"\r?\n\r?\n", head)
        if blank is None:
            return  # header longer than we look at: leave it to ITK
        fields = {}
        for line in head[: blank.start()].decode("latin-1").splitlines()[1:]:
            if ": " in line and not line.startswith("#"):
                key, value = line.split(": ", 1)
                fields[key.strip().lower().replace(" ", "")] = value.strip()
        encoding = fields.get("encoding", "raw").lower()
        kind = {"gzip": "gzip", "gz": "gzip", "bzip2": "bzip2", "bz2": "bzip2"}.get(encoding)
        if kind is None or "lineskip" in fields or "byteskip" in fields:
            return
        data_file = fields.get("datafile")
        if data_file is None:
            _verify_stream(path, blank.end(), kind)
        elif "%" not in data_file and not data_file.upper().startswith("LIST"):
            _verify_stream(path.parent / data_file.split()[0], 0, kind)
        return
    match = re.search(rb"^ElementDataFile\s*=\s*(.*?)\r?\n", head, re.MULTILINE)
    compressed = re.search(rb"^CompressedData\s*=\s*True", head, re.MULTILINE | re.IGNORECASE)
    if match is None or compressed is None:
        return
    data_file = match.group(1).decode("latin-1").strip()
    if data_file.upper() == "LOCAL":
        _verify_stream(path, match.end(), "zlib")
    elif "%" not in data_file and not data_file.upper().startswith("LIST"):
        _verify_stream(path.parent / data_file, 0, "zlib")


def _read_itk(path: Path) -> tuple[np.ndarray, ImageMeta]:
    _check_itk_compression(path)
    try:
        img = sitk.ReadImage(str(path))
        array = sitk.GetArrayFromImage(img)
    except RuntimeError as exc:
        problem = str(exc).strip().splitlines()
        detail = problem[-1] if problem else ""
        raise InputError(
            path, f"truncated or corrupt image file (SimpleITK could not read it: {detail})"
        ) from exc
    dim = img.GetDimension()
    if dim < 3:
        raise InputError(
            path, f"2D image, expected a 3D volume (size {img.GetSize()}, {dim} dimensions)"
        )
    n_comp = img.GetNumberOfComponentsPerPixel()
    # SimpleITK: (z, y, x) or (t, z, y, x), plus a trailing component axis for vector images.
    spatial_axes = list(range(dim))[::-1]  # -> (x, y, z[, t])
    array = array.transpose([*spatial_axes, dim] if n_comp > 1 else spatial_axes)
    if dim == 4:
        if n_comp > 1:
            raise InputError(path, "4D vector image is not supported")
        direction4 = np.asarray(img.GetDirection(), dtype=np.float64).reshape(4, 4)
        if not np.allclose(direction4[:3, 3], 0) or not np.allclose(direction4[3, :3], 0):
            raise InputError(path, "4D image whose 4th axis is mixed with space is not supported")
        direction = direction4[:3, :3]
        spacing = np.asarray(img.GetSpacing()[:3])
        origin = np.asarray(img.GetOrigin()[:3])
    elif dim == 3:
        direction = np.asarray(img.GetDirection(), dtype=np.float64).reshape(3, 3)
        spacing = np.asarray(img.GetSpacing())
        origin = np.asarray(img.GetOrigin())
    else:
        raise InputError(path, f"{dim}D image is not supported (expected 3D or 4D)")
    raw_affine = np.eye(4)
    raw_affine[:3, :3] = direction * spacing
    raw_affine[:3, 3] = origin
    _check_affine(raw_affine, path)
    affine = affine_from_lps(direction, spacing, origin)
    modality = "unknown"
    if img.HasMetaDataKey("Modality"):
        modality = _MET_MODALITY.get(img.GetMetaData("Modality").strip(), "unknown")
    return np.ascontiguousarray(array), ImageMeta(
        affine=affine, source=str(path), modality=modality
    )


# --------------------------------------------------------------------------------------------
# Writing


def _qform_is_representable(affine: np.ndarray, tol: float = 1e-5) -> bool:
    """True if the 3x3 part is a rotation (or reflection) times zooms: no shear."""
    m = affine[:3, :3]
    zooms = np.linalg.norm(m, axis=0)
    r = m / zooms
    return bool(np.allclose(r.T @ r, np.eye(3), atol=tol))


def _writable_array(array: np.ndarray, dtype: np.dtype | str | type | None) -> np.ndarray:
    array = np.asarray(array)
    if dtype is not None:
        dtype = np.dtype(dtype)
        if np.issubdtype(dtype, np.integer) and np.issubdtype(array.dtype, np.floating):
            info = np.iinfo(dtype)
            rounded = np.rint(array)
            if rounded.size and (rounded.min() < info.min or rounded.max() > info.max):
                raise ValueError(
                    f"dtype={dtype} cannot hold values in [{array.min()}, {array.max()}]"
                )
            array = rounded
        array = array.astype(dtype, copy=False)
    if array.dtype == np.bool_:
        array = array.astype(np.uint8)
    elif array.dtype == np.float16:
        array = array.astype(np.float32)
    return array


def write_image(
    path: str | Path,
    array: np.ndarray,
    meta: ImageMeta,
    dtype: np.dtype | str | type | None = None,
) -> Path:
    """Write ``array`` with ``meta``'s geometry, atomically, without identifiers.

    Args:
        path: Destination; ``.nii``, ``.nii.gz``, ``.nrrd`` or ``.mha`` (detached-header formats
            ``.nhdr`` / ``.mhd`` are refused: their two files cannot be renamed atomically).
        array: ``(i, j, k)`` or ``(i, j, k, t/c)`` voxels (4D goes to NIfTI as a 4th axis, to
            NRRD/MHA as a vector image).
        meta: Geometry (``meta.affine``, RAS+).
        dtype: Optional on-disk dtype; floats are rounded when cast to an integer dtype.

    Returns:
        The written path.
    """
    path = Path(path)
    suffix = image_suffix(path)
    if suffix not in WRITE_SUFFIXES:
        raise ValueError(f"cannot write {path}: suffix must be one of {', '.join(WRITE_SUFFIXES)}")
    array = _writable_array(array, dtype)
    if array.ndim not in (3, 4):
        raise ValueError(f"cannot write {path}: array must be 3D or 4D, got shape {array.shape}")
    affine = np.asarray(meta.affine, dtype=np.float64)
    with atomic_path(path) as tmp:  # the temp name keeps the real suffix: .tmp-xxxx-<name>
        if suffix in NIFTI_SUFFIXES:
            _write_nifti(tmp, array, affine)
        else:
            _write_itk(tmp, array, affine)
    return path


def _write_nifti(path: Path, array: np.ndarray, affine: np.ndarray) -> None:
    img = nib.Nifti1Image(array, affine, dtype=array.dtype)
    header = img.header
    header.set_data_dtype(array.dtype)
    header.set_sform(affine, code=1)  # 1 = scanner-based anatomical coordinates
    if _qform_is_representable(affine):
        header.set_qform(affine, code=1)
    else:  # the qform can hold only rotation + zooms: leave it unset rather than wrong
        header.set_qform(affine, code=0)
    header.set_xyzt_units(xyz="mm", t="sec")
    header["descrip"] = b""
    header["aux_file"] = b""
    header["intent_name"] = b""
    header["scl_slope"] = np.nan  # raw values are the real values
    header["scl_inter"] = np.nan
    img.header.extensions.clear()
    nib.save(img, str(path))


def _write_itk(path: Path, array: np.ndarray, affine: np.ndarray) -> None:
    if array.ndim == 4:  # (i, j, k, c) -> (z, y, x, c) vector image
        img = sitk.GetImageFromArray(np.ascontiguousarray(array.transpose(2, 1, 0, 3)), True)
    else:  # (i, j, k) -> (z, y, x)
        img = sitk.GetImageFromArray(np.ascontiguousarray(array.transpose(2, 1, 0)))
    direction, spacing, origin = lps_from_affine(affine)
    img.SetDirection(tuple(float(v) for v in direction.ravel()))
    img.SetSpacing(tuple(float(v) for v in spacing))
    img.SetOrigin(tuple(float(v) for v in origin))
    sitk.WriteImage(img, str(path), useCompression=True)


# --------------------------------------------------------------------------------------------
# Orientation


def reorient(
    array: np.ndarray, meta: ImageMeta, target: str = "RAS", *, channel_first: bool = False
) -> tuple[np.ndarray, ImageMeta]:
    """Permute/flip voxel axes so they point along ``target`` (e.g. "RAS", "LPS"); no resampling.

    The world position of every voxel is unchanged: the affine is updated exactly with
    ``nibabel.orientations.inv_ornt_aff``. Oblique images get the closest axis-aligned code.

    Args:
        array: ``(i, j, k)``, ``(i, j, k, ...)`` or, with ``channel_first``, ``(C, i, j, k)``.
        meta: Geometry of ``array``.
        target: Three letters, one from each of R/L, A/P, S/I.
        channel_first: The first axis is a channel axis, not a spatial one.

    Returns:
        ``(array, meta)``; the same array object when already in ``target`` orientation, else a
        C-contiguous copy.
    """
    target = str(target).upper()
    pairs = ("RL", "AP", "SI")
    axes = sorted(i for c in target for i, pair in enumerate(pairs) if c in pair)
    if len(target) != 3 or axes != [0, 1, 2]:
        raise ValueError(f"target orientation must be like 'RAS' or 'LPS', got {target!r}")
    array = np.asarray(array)
    spatial = array.shape[1:4] if channel_first else array.shape[:3]
    if len(spatial) != 3 or array.ndim < (4 if channel_first else 3):
        raise ValueError(
            f"reorient needs a {'(C, i, j, k)' if channel_first else '(i, j, k, ...)'} array, "
            f"got shape {array.shape}"
        )
    transform = ornt_transform(io_orientation(meta.affine), axcodes2ornt(tuple(target)))
    if np.array_equal(transform, [[0, 1], [1, 1], [2, 1]]):
        return array, meta.with_affine(meta.affine)
    moved = np.moveaxis(array, 0, -1) if channel_first else array
    out = apply_orientation(moved, transform)  # acts on the first three axes only
    if channel_first:
        out = np.moveaxis(out, -1, 0)
    affine = meta.affine @ inv_ornt_aff(transform, spatial)
    return np.ascontiguousarray(out), meta.with_affine(affine)
