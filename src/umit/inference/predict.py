"""``umit predict``: run a fine-tuned model on raw images, outputs on the input's own grid.

A model file (``best.pt``) carries the preprocessing plan it was trained with. For each input
(NIfTI / NRRD / MetaImage file, DICOM series folder, or DICOMweb series) we apply that plan in
memory (:func:`umit.preprocess.apply.apply_plan`: RAS, crop, normalize, resample), run the model,
and:

* segmentation: sliding-window argmax on the model grid, then nearest-neighbour back onto the
  input grid (:func:`umit.preprocess.resample.restore_original`) and written with the input's
  affine, so the mask overlays the input voxel for voxel;
* classification: class probabilities of the centred input, printed and written to
  ``predictions.csv`` / ``predictions.json``.

With ``dicom_seg`` (``--dicom-seg``), the mask of each DICOM series input is also written as a
DICOM Segmentation beside it (``<name>.seg.dcm``, :mod:`umit.inference.dicom_seg`): the same
label map, referencing the series' own images; with ``stow`` (``--stow URL``) each SEG is then
sent to the PACS by STOW-RS, with the DICOMweb client ``umit ingest`` uses
(:class:`umit.ingest.dicomweb.DicomWebClient`: same URLs, credentials, timeouts and retries).

A DICOMweb input, ``dicomweb+http(s)://HOST:PORT/ROOT/studies/STUDY_UID/series/SERIES_UID``
(or ``.../studies/STUDY_UID``: every image series of the study), is retrieved series by series
into a temporary folder under the output folder and predicted on as that folder
(:mod:`umit.inference.dicomweb_input`): the mask and the SEG are those of the same files on disk,
and are named by series UID.

A folder of inputs (or a study) is a batch: a failing input is recorded in ``failures.json``
with its reason and the others still run.
"""

from __future__ import annotations

import csv
import io
import logging
import time
from collections.abc import Callable, Iterable
from contextlib import ExitStack, closing
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from pydantic import Field, field_validator

from umit import __version__
from umit.config import save_config
from umit.data.cases import centre_crop_or_pad
from umit.data.io import IMAGE_SUFFIXES, image_suffix, write_image
from umit.data.meta import ImageMeta
from umit.data.plan import Plan
from umit.errors import InputError, UmitError
from umit.inference.dicomweb_input import TMP_DIR, list_series, open_client, retrieve_each
from umit.inference.onnx_backend import OnnxModel
from umit.inference.segment import full_resolution, segment_volume
from umit.ingest.dicom import is_dicom_file
from umit.ingest.dicomweb import (
    SERIES_URL_FORM,
    AuthenticationError,
    DicomWebClient,
    DicomWebError,
    DicomWebSettings,
    ServerUnreachable,
    StoreFailed,
    is_remote_source,
    parse_url,
    read_auth,
)
from umit.ingest.read import read_volume
from umit.preprocess.apply import apply_plan
from umit.preprocess.resample import restore_original
from umit.train.checkpoint import InferenceSpec, load_model
from umit.train.precision import resolve_precision
from umit.utils.fileio import atomic_write_json, atomic_write_text

if TYPE_CHECKING:
    from umit.inference.dicom_seg import Algorithm

log = logging.getLogger(__name__)

OUTPUT_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha")


class PredictConfig(DicomWebSettings):
    """Settings of ``umit predict``."""

    inputs: Path | str
    """An image file, a DICOM series folder, or a folder of them; or a DICOMweb series
    ``dicomweb+http(s)://HOST:PORT/ROOT/studies/STUDY_UID/series/SERIES_UID`` (or
    ``.../studies/STUDY_UID``: its image series). Credentials: ``pacs_auth_file``, else
    ``$UMIT_PACS_AUTH`` (never in the URL)."""
    model: Path
    """``best.pt`` from ``umit finetune``, or ``M.onnx`` from ``umit export`` (both carry the
    preprocessing plan and the inference spec)."""
    backend: Literal["auto", "torch", "onnxruntime"] = "auto"
    """``auto``: onnxruntime for a ``.onnx`` model, else torch. The same preprocessing, sliding
    window and post-processing run either way; onnxruntime runs on the CPU in fp32."""
    out: Path = Path("predictions")
    """Output folder (or, for one input, an output image path ending in .nii.gz/.nrrd/.mha)."""
    overlap: float | None = Field(default=None, ge=0, lt=1)
    """Sliding-window overlap (default: the fine-tuning validation setting)."""
    sw_batch_size: int = Field(default=2, ge=1)
    """Windows per forward pass."""
    tta: bool = False
    """Test-time augmentation: average over the 7 flips of the three axes."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """Autocast precision of a torch model: ``auto`` = bf16 where the device runs it fast (CUDA
    with bf16; CPUs with AVX-512 BF16 / AMX and a measured speed-up), else fp32
    (:mod:`umit.train.precision`)."""
    device: str = "auto"
    """``auto`` (CUDA when present), ``cpu`` or ``cuda[:N]``."""
    suffix: str | None = None
    """Mask file format (default: the input's; DICOM inputs give .nii.gz)."""
    dicom_seg: bool = False
    """Also write each DICOM series input's mask as a DICOM Segmentation (``<name>.seg.dcm``)."""
    seg_type: Literal["binary", "labelmap"] = "binary"
    """SEG encoding: ``binary`` (Segmentation Storage, widely supported) or ``labelmap`` (the
    2024 Label Map Segmentation Storage class, which many PACS still reject)."""
    stow: str | None = None
    """DICOMweb root to send each SEG to by STOW-RS, as ``umit ingest`` takes it
    (``dicomweb+http(s)://HOST:PORT/ROOT``; plain ``http(s)://`` too); implies ``dicom_seg``.
    Credentials: ``stow_auth_file``, else ``$UMIT_PACS_AUTH`` (never in the URL)."""
    stow_auth_file: Path | None = None
    """File whose first line is ``user:password`` for ``stow`` (chmod 600). Only this path is
    recorded in ``predict_config.yaml``; the credentials never are."""
    stow_timeout_s: float = Field(default=60.0, gt=0)
    """STOW-RS connect timeout and read timeout (seconds without data) of each attempt."""
    stow_retries: int = Field(default=3, ge=0, le=20)
    """STOW-RS retries after a connection error, a read timeout or HTTP 429/502/503/504."""
    stow_backoff_s: float = Field(default=1.0, ge=0)
    """Back-off factor between STOW-RS retries: waits of 0, 2, 4... x this, at most 30 s."""

    @field_validator("inputs", mode="before")
    @classmethod
    def _url_or_path(cls, value: Any) -> Any:
        """A ``scheme://`` input stays a string (a Path would fold ``//``); others are paths."""
        if isinstance(value, str) and "://" in value:
            return value
        return Path(value) if isinstance(value, str) else value


# ---------------------------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------------------------
def _holds_dicom(folder: Path) -> bool:
    return any(p.is_file() and is_dicom_file(p) for p in sorted(folder.iterdir()))


def find_inputs(path: Path) -> list[Path]:
    """The images under ``path``: itself (a file or a DICOM folder), or the image files and DICOM
    series sub-folders of a folder (not recursive beyond one level)."""
    path = Path(path)
    if not path.exists():
        raise InputError(path, "no such file or folder")
    if path.is_file():
        return [path]
    files = sorted(p for p in path.iterdir() if p.is_file() and image_suffix(p) is not None)
    series = sorted(p for p in path.iterdir() if p.is_dir() and _holds_dicom(p))
    if not files and not series and _holds_dicom(path):
        return [path]
    if not files and not series:
        raise InputError(
            path, f"no images found (expected {', '.join(IMAGE_SUFFIXES)} files or DICOM folders)"
        )
    return files + series


def input_name(path: Path) -> str:
    """Case name of an input: the file name without its image suffix, or the folder name."""
    suffix = image_suffix(path) if path.is_file() else None
    return path.name[: -len(suffix)] if suffix else path.name


def load_channels(path: Path, plan: Plan) -> tuple[list[np.ndarray], ImageMeta]:
    """Read one input as the plan's channels: a 3D image for one channel, or a 4D image whose
    last axis holds the plan's channels in order."""
    array, meta = read_volume(path)
    n = len(plan.channels)
    if array.ndim == 3:
        if n != 1:
            raise InputError(
                path,
                f"3D image, but the model expects {n} channels ({', '.join(plan.channel_names)}): "
                f"give a 4D image with the channels on the last axis",
            )
        return [np.asarray(array, np.float32)], meta
    if array.ndim == 4 and array.shape[3] == n:
        return [np.asarray(array[..., c], np.float32) for c in range(n)], meta
    raise InputError(
        path,
        f"image of shape {array.shape} does not match the model's {n} channel(s) "
        f"({', '.join(plan.channel_names)})",
    )


# ---------------------------------------------------------------------------------------------
# the model
# ---------------------------------------------------------------------------------------------
class Predictor:
    """A loaded model plus its plan; ``predict(path)`` handles one input."""

    def __init__(self, cfg: PredictConfig):
        self.cfg = cfg
        backend = cfg.backend
        if backend == "auto":
            backend = "onnxruntime" if cfg.model.suffix == ".onnx" else "torch"
        self.backend = backend
        if backend == "onnxruntime":
            if cfg.precision not in ("auto", "fp32"):
                raise ValueError(
                    f"precision={cfg.precision} applies to the torch backend; an ONNX graph runs "
                    "in fp32 (use precision=auto or fp32 with --backend onnxruntime)"
                )
            if cfg.device not in ("auto", "cpu"):
                raise ValueError(f"the onnxruntime backend runs on the CPU, not {cfg.device!r}")
            onnx_model = OnnxModel(cfg.model)
            self.model: Callable[[torch.Tensor], Any] = onnx_model
            ckpt: dict[str, Any] = {
                "plan": onnx_model.plan,
                "spec": onnx_model.spec,
                "model_name": onnx_model.model_name,
            }
            self.device = torch.device("cpu")
            self.precision = "fp32"
        else:
            module, ckpt = load_model(cfg.model)
            if cfg.device == "auto":
                self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
            else:
                self.device = torch.device(cfg.device)
            module.to(self.device).eval()
            self.model = module
            self.precision = resolve_precision(cfg.precision, self.device).precision
        if not ckpt.get("plan"):
            raise InputError(cfg.model, "the model file carries no preprocessing plan")
        self.plan = Plan.model_validate(ckpt["plan"])
        spec = InferenceSpec.model_validate(ckpt["spec"])
        self.task: str = spec.task
        self.crop_size = tuple(int(s) for s in spec.roi_size)
        self.overlap = cfg.overlap if cfg.overlap is not None else spec.overlap
        self.class_names: list[str] = list(spec.class_names)
        self.label_names: dict[str, int] = dict(spec.label_names)
        self.model_name = str(ckpt.get("model_name") or "unknown")

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        return full_resolution(self.model(x))

    def segment(self, image: np.ndarray, pad_value: float) -> np.ndarray:
        """(C, X, Y, Z) model-grid image -> (X, Y, Z) uint8 label map on the same grid."""
        flips = [(2,), (3,), (4,), (2, 3), (2, 4), (3, 4), (2, 3, 4)] if self.cfg.tta else []
        return segment_volume(
            self.model,
            image,
            self.crop_size,
            overlap=self.overlap,
            sw_batch_size=self.cfg.sw_batch_size,
            padding_value=pad_value,
            precision=self.precision,
            tta_flips=flips,
            device=self.device,
        )

    @torch.no_grad()
    def classify(self, image: np.ndarray, pad_values: list[float]) -> np.ndarray:
        """(C, X, Y, Z) model-grid image -> class probabilities of the centred input."""
        x = torch.from_numpy(
            centre_crop_or_pad(np.asarray(image, np.float32), self.crop_size, pad_values)
        )
        with torch.autocast(
            self.device.type,
            dtype=torch.bfloat16 if self.precision == "bf16" else torch.float16,
            enabled=self.precision != "fp32",
        ):
            logits = self._forward(x[None].to(self.device))
        return logits.float().softmax(1)[0].cpu().numpy()

    def predict(self, path: Path) -> tuple[np.ndarray, ImageMeta]:
        """One input -> (label map on the input's grid, the input's meta) or (probabilities, meta)."""
        arrays, meta = load_channels(path, self.plan)
        image, _, geometry = apply_plan(arrays, meta.affine, self.plan, source=path)
        del arrays
        if self.task == "classification":
            return self.classify(image, geometry["pad_values"]), meta
        pred = self.segment(image, float(geometry["pad_values"][0]))
        mask, _ = restore_original(pred, geometry)
        return mask, meta


# ---------------------------------------------------------------------------------------------
# the command
# ---------------------------------------------------------------------------------------------
def mask_path(out: Path, path: Path, suffix: str | None, single: bool) -> Path:
    """Where the mask of ``path`` goes: ``out`` itself for one input named like an image,
    else ``out/<name><suffix>`` (the input's format; DICOM gives .nii.gz)."""
    if single and image_suffix(out) is not None:
        return out
    if suffix is None:
        suffix = image_suffix(path) if path.is_file() else ".nii.gz"
        suffix = ".nii.gz" if suffix in (None, ".nhdr", ".mhd") else suffix
    if suffix not in OUTPUT_SUFFIXES:
        raise ValueError(f"suffix must be one of {', '.join(OUTPUT_SUFFIXES)}, got {suffix!r}")
    return out / f"{input_name(path)}{suffix}"


def seg_path(mask: Path) -> Path:
    """The DICOM SEG beside a mask: ``CT_1.nii.gz`` -> ``CT_1.seg.dcm``."""
    suffix = image_suffix(mask) or mask.suffix
    return mask.with_name(f"{mask.name[: -len(suffix)] if suffix else mask.name}.seg.dcm")


def run(cfg: PredictConfig, *, auth: tuple[str, str] | None = None) -> dict[str, Any]:
    """Predict every input; returns a summary (outputs, failures, seconds).

    Args:
        auth: ``(user, password)`` for a DICOMweb input and for ``stow``; default:
            ``cfg.pacs_auth_file`` (input) and ``cfg.stow_auth_file`` (stow), else
            ``$UMIT_PACS_AUTH``.

    Raises:
        InputError: an unusable input, URL or auth file (before any prediction).
        DicomWebError: a DICOMweb input whose server refuses the credentials
            (:class:`~umit.ingest.dicomweb.AuthenticationError`), cannot be reached, or has no
            such study or series (before anything is written).
        ValueError: a bad setting.
    """
    if cfg.suffix is not None and cfg.suffix not in OUTPUT_SUFFIXES:
        raise ValueError(f"suffix must be one of {', '.join(OUTPUT_SUFFIXES)}, got {cfg.suffix!r}")
    want_seg = cfg.dicom_seg or cfg.stow is not None
    stow_auth = auth
    if cfg.stow is not None:  # a bad URL or auth file fails before any prediction
        try:
            parse_url(cfg.stow)
            if stow_auth is None:
                stow_auth = read_auth(file=cfg.stow_auth_file)
        except ValueError as exc:  # the message never holds the URL or a password
            raise InputError(None, f"stow: {exc}") from None
    outputs: list[dict[str, Any]] = []
    failures: dict[str, str] = {}
    remote = None
    with ExitStack() as stack:
        if is_remote_source(cfg.inputs):  # credentials and UIDs checked before anything else
            client, study_uid, series_uid = open_client(
                str(cfg.inputs),
                auth=auth,
                auth_file=cfg.pacs_auth_file,
                timeout_s=cfg.pacs_timeout_s,
                retries=cfg.pacs_retries,
                backoff_s=cfg.pacs_backoff_s,
            )
            stack.enter_context(client)
            remote = list_series(client, study_uid, series_uid)
            single = series_uid is not None
        else:
            local = find_inputs(_local_path(cfg.inputs))
            single = len(local) == 1 and local[0] == cfg.inputs  # IN is one file or one series
        predictor = Predictor(cfg)
        if want_seg and predictor.task != "segmentation":
            raise ValueError(
                f"dicom_seg needs a segmentation model, {cfg.model} is {predictor.task}"
            )
        algorithm = None
        if want_seg:  # highdicom is imported only when a SEG is asked for
            from umit.inference.dicom_seg import Algorithm, file_sha256

            algorithm = Algorithm(predictor.model_name, __version__, file_sha256(cfg.model))
        folder = cfg.out.parent if single and image_suffix(cfg.out) is not None else cfg.out
        folder.mkdir(parents=True, exist_ok=True)
        save_config(cfg, folder, "predict_config.yaml")
        items: Iterable[tuple[str, Path]]
        if remote is not None:  # one series on disk at a time, deleted after
            retrieved = retrieve_each(
                client, remote, folder / TMP_DIR, failures, cfg.pacs_transfer_syntax
            )
            items = stack.enter_context(closing(retrieved))
        else:
            items = ((str(p), p) for p in local)
        t0 = time.perf_counter()
        for name, path in items:
            row = _predict_one(cfg, predictor, name, path, single, algorithm, failures)
            if row is not None:
                outputs.append(row)
    if cfg.stow is not None:
        _stow_segs(cfg, stow_auth, outputs, failures)
    if predictor.task == "classification":
        _write_classification(folder, outputs, predictor.class_names)
    if failures:
        atomic_write_json(folder / "failures.json", failures)
    else:
        (folder / "failures.json").unlink(missing_ok=True)
    return {
        "task": predictor.task,
        "outputs": outputs,
        "failures": failures,
        "out": str(folder),
        "seconds": time.perf_counter() - t0,
        "label_names": predictor.label_names,
    }


def _local_path(inputs: Path | str) -> Path:
    """``inputs`` as a local path; a URL of another kind than DICOMweb is refused (not echoed:
    it may hold a password)."""
    if isinstance(inputs, str):
        raise InputError(
            None,
            f"unsupported input URL scheme {inputs.split('://')[0]!r}: a PACS is read over "
            f"DICOMweb; {SERIES_URL_FORM}",
        )
    return inputs


def _predict_one(
    cfg: PredictConfig,
    predictor: Predictor,
    name: str,
    path: Path,
    single: bool,
    algorithm: Algorithm | None,
    failures: dict[str, str],
) -> dict[str, Any] | None:
    """Predict the input at ``path`` (``name`` in rows and ``failures``: its path, or its
    DICOMweb URL), write its mask (and SEG); returns its row, None when it failed."""
    t = time.perf_counter()
    try:
        result, meta = predictor.predict(path)
    except (UmitError, ValueError, OSError) as exc:
        failures[name] = str(exc)
        log.error("predict: %s failed: %s", name, exc)
        return None
    row: dict[str, Any] = {"input": name, "seconds": round(time.perf_counter() - t, 3)}
    if predictor.task == "classification":
        names = predictor.class_names or [str(i) for i in range(len(result))]
        row["probabilities"] = {n: float(p) for n, p in zip(names, result, strict=True)}
        row["predicted"] = names[int(np.argmax(result))]
        return row
    target = mask_path(cfg.out, path, cfg.suffix, single)
    write_image(target, result, meta, dtype=np.uint8)
    row["mask"] = str(target)
    row["labels"] = {
        str(v): int(n) for v, n in zip(*np.unique(result, return_counts=True), strict=True)
    }
    if algorithm is not None:
        seg = _write_seg(cfg, predictor, path, result, meta, target, algorithm)
        if isinstance(seg, str):
            failures[name] = seg
        else:
            row["dicom_seg"] = seg
    return row


def _write_seg(
    cfg: PredictConfig,
    predictor: Predictor,
    path: Path,
    mask: np.ndarray,
    meta: ImageMeta,
    target: Path,
    algorithm: Algorithm,
) -> dict[str, Any] | str:
    """Write the SEG of one input; returns its summary, or why there is none."""
    from umit.inference.dicom_seg import summary, write_dicom_seg

    if not path.is_dir():
        return "dicom_seg: the input is not a DICOM series folder (the mask was written)"
    try:
        written = write_dicom_seg(
            mask,
            path,
            seg_path(target),
            affine=meta.affine,
            label_names=predictor.label_names,
            algorithm=algorithm,
            seg_type=cfg.seg_type,
        )
    except (UmitError, ValueError, OSError) as exc:
        log.error("predict: DICOM SEG of %s failed: %s", path, exc)
        return f"dicom_seg: {exc} (the mask was written)"
    return {**summary(written), "seconds": round(written.seconds, 3)}


def _stow_segs(
    cfg: PredictConfig,
    auth: tuple[str, str] | None,
    outputs: list[dict[str, Any]],
    failures: dict[str, str],
) -> None:
    """Send every written SEG to ``cfg.stow``, one STOW-RS request each; a failed upload is
    recorded in ``failures`` (the files stay). After refused credentials or an unreachable
    server the remaining SEGs are not tried (each would wait through the same retries)."""
    client = DicomWebClient(
        cfg.stow,
        auth=auth,
        timeout_s=cfg.stow_timeout_s,
        retries=cfg.stow_retries,
        backoff_s=cfg.stow_backoff_s,
        max_connections=1,
    )
    fatal = None
    with client:
        for row in outputs:
            seg = row.get("dicom_seg")
            if not seg:
                continue
            kept = f" (the SEG was written: {seg['path']})"
            if fatal is not None:
                failures[row["input"]] = f"stow: not sent, {fatal}{kept}"
                continue
            try:
                res = client.store_instances([seg["path"]])
            except StoreFailed as exc:  # answered, but refused: what and why is in the result
                res = exc.result
                failures[row["input"]] = f"stow: {exc}{kept}"
            except DicomWebError as exc:
                failures[row["input"]] = f"stow: {exc}{kept}"
                log.error("predict: STOW-RS of %s failed: %s", seg["path"], exc)
                if isinstance(exc, AuthenticationError | ServerUnreachable):
                    fatal = str(exc)
                continue
            seg["stow"] = {
                "url": res.url,
                "status": res.status,
                "attempts": res.attempts,
                "seconds": round(res.seconds, 3),
            }


def _write_classification(folder: Path, rows: list[dict[str, Any]], names: list[str]) -> None:
    atomic_write_json(folder / "predictions.json", rows)
    names = names or sorted({k for r in rows for k in r["probabilities"]})
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["input", "predicted", *[f"p_{n}" for n in names]])
    for r in rows:
        w.writerow([r["input"], r["predicted"], *[f"{r['probabilities'][n]:.6f}" for n in names]])
    atomic_write_text(folder / "predictions.csv", buf.getvalue())
