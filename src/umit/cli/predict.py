"""``umit predict``: apply a fine-tuned model to raw images (NIfTI / NRRD / MHA / DICOM series),
or to a series in a PACS (dicomweb+http://HOST:PORT/ROOT/studies/STUDY_UID/series/SERIES_UID,
or .../studies/STUDY_UID for every image series of a study: retrieved by WADO-RS into a
temporary folder under OUT, removed afterwards; outputs named by series UID).

Segmentation masks are written on the input's own grid (they overlay the input voxel for voxel);
classification probabilities are printed and written to predictions.csv / predictions.json.
With --dicom-seg, the mask of a DICOM series is also written as a DICOM Segmentation
(<name>.seg.dcm) that references the series' images; --stow dicomweb+http://HOST:PORT/ROOT
sends it to a PACS (STOW-RS). Credentials for a PACS input and for --stow: --auth-file or
$UMIT_PACS_AUTH, as for umit ingest (docs/pacs.md).
"""

from __future__ import annotations

import argparse

from umit.cli.common import add_config_args


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "predict",
        help="run a fine-tuned model on raw images; masks come back on the input's grid",
        description=__doc__,
    )
    p.add_argument(
        "inputs",
        nargs="?",
        default=None,
        help="image file, DICOM folder, a folder of them, or a DICOMweb series "
        "dicomweb+http(s)://HOST:PORT/ROOT/studies/STUDY_UID/series/SERIES_UID "
        "(or .../studies/STUDY_UID)",
    )
    p.add_argument(
        "--model", default=None, help="best.pt from umit finetune, or M.onnx from umit export"
    )
    p.add_argument(
        "--backend",
        choices=["auto", "torch", "onnxruntime"],
        default=None,
        help="auto (default): onnxruntime for a .onnx model, else torch",
    )
    p.add_argument("--out", default=None, help="output folder (or an image path for one input)")
    p.add_argument("--tta", action="store_true", default=None, help="average over axis flips")
    p.add_argument(
        "--dicom-seg",
        action="store_true",
        default=None,
        help="also write a DICOM SEG of each DICOM series input (<name>.seg.dcm)",
    )
    p.add_argument(
        "--seg-type",
        choices=["binary", "labelmap"],
        default=None,
        help="SEG encoding (default binary; labelmap is the 2024 SOP class many PACS reject)",
    )
    p.add_argument(
        "--stow",
        metavar="URL",
        default=None,
        help="DICOMweb root (dicomweb+http(s)://HOST:PORT/ROOT) to send each SEG to by STOW-RS "
        "(implies --dicom-seg)",
    )
    p.add_argument(
        "--auth-file",
        default=None,
        metavar="FILE",
        help="PACS credentials (DICOMweb input and --stow): a file whose first line is "
        "user:password (chmod 600); else $UMIT_PACS_AUTH",
    )
    add_config_args(p)
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    import sys

    from umit.config import build_config
    from umit.inference.predict import PredictConfig, run
    from umit.ingest.dicomweb import DicomWebError

    cfg = build_config(
        PredictConfig,
        args.config,
        args.overrides,
        inputs=args.inputs,
        model=args.model,
        backend=args.backend,
        out=args.out,
        tta=args.tta,
        dicom_seg=args.dicom_seg,
        seg_type=args.seg_type,
        stow=args.stow,
        stow_auth_file=args.auth_file,
        pacs_auth_file=args.auth_file,
    )
    try:
        s = run(cfg)
    except DicomWebError as exc:  # refused credentials, server gone, no such series: nothing ran
        print(f"umit predict: error: {exc}", file=sys.stderr)
        return 1
    n_ok, n_bad = len(s["outputs"]), len(s["failures"])
    print(
        f"predict ({s['task']}): {n_ok} done, {n_bad} failed in {s['seconds']:.1f} s -> {s['out']}"
    )
    for row in s["outputs"]:
        if s["task"] == "classification":
            probs = ", ".join(f"{k}={v:.3f}" for k, v in row["probabilities"].items())
            print(f"  {row['input']}: {row['predicted']} ({probs})")
        else:
            print(f"  {row['input']} -> {row['mask']}")
            if row.get("dicom_seg"):
                seg = row["dicom_seg"]
                stow = seg.get("stow")
                sent = f", sent to {stow['url']} in {stow['seconds']:.2f} s" if stow else ""
                print(
                    f"    DICOM SEG ({seg['type']}, {len(seg['segments'])} segments) written in "
                    f"{seg['seconds']:.2f} s -> {seg['path']}{sent}"
                )
    for path, why in s["failures"].items():
        print(f"  FAILED {path}: {why}")
    return 1 if n_bad else 0
