"""``umit ingest SRC --out RAW``: DICOM / NIfTI / NRRD / MHA / collections / MedMNIST -> RAW.

SRC may also be a PACS's DICOMweb service: ``umit ingest dicomweb+http://HOST:PORT/dicom-web
--out RAW [--study UID]... [--query 'ModalitiesInStudy=CT&StudyDate=20240101-20240131']
[--auth-file FILE]`` (docs/pacs.md). Exit status 1 when an item failed or the server refused
the credentials or could not be reached.
"""

from __future__ import annotations

import argparse
import json

from umit.cli.common import add_config_args


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "ingest",
        help="read DICOM series, NIfTI/NRRD/MHA files, MSD/nnU-Net collections or MedMNIST .npz "
        "into canonical NIfTI + a SQLite catalog (resumable)",
        description=__doc__,
    )
    p.add_argument(
        "src",
        help="source folder, dataset.json, MedMNIST .npz or a DICOMweb service "
        "dicomweb+http(s)://HOST:PORT/ROOT",
    )
    p.add_argument("--out", required=True, help="RAW output folder (resumed if it exists)")
    p.add_argument("--workers", type=int, default=None, help="parallel loader processes")
    p.add_argument("--site", default=None, help="site label for items that have none")
    g = p.add_argument_group("DICOMweb source (a PACS; see docs/pacs.md)")
    g.add_argument(
        "--study",
        action="append",
        default=None,
        metavar="UID",
        help="StudyInstanceUID to ingest (repeatable; default: every study --query matches)",
    )
    g.add_argument(
        "--query",
        default=None,
        metavar="QIDO",
        help="QIDO-RS study search, e.g. 'ModalitiesInStudy=CT&StudyDate=20240101-20240131'",
    )
    g.add_argument(
        "--auth-file",
        default=None,
        metavar="FILE",
        help="file whose first line is user:password (chmod 600); else $UMIT_PACS_AUTH",
    )
    g.add_argument(
        "--auth",
        default=None,
        metavar="USER:PASSWORD",
        help="credentials on the command line (other users can see them in the process list: "
        "prefer --auth-file or $UMIT_PACS_AUTH)",
    )
    g.add_argument(
        "--pacs-workers", type=int, default=None, help="series retrieved at once (default 4)"
    )
    add_config_args(p)
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    import sys
    from urllib.parse import parse_qsl

    from umit.config import build_config
    from umit.errors import InputError
    from umit.ingest.dicomweb import DicomWebError, read_auth
    from umit.ingest.run import IngestConfig, run

    query = None
    if args.query is not None:
        try:
            query = dict(parse_qsl(args.query, keep_blank_values=True, strict_parsing=True))
        except ValueError as exc:
            raise InputError(None, f"--query {args.query!r} is not KEY=VALUE&...: {exc}") from None
    auth = None
    if args.auth is not None:
        try:
            auth = read_auth(args.auth)
        except ValueError as exc:
            raise InputError(None, str(exc)) from None
    cfg = build_config(
        IngestConfig,
        args.config,
        args.overrides,
        src=args.src,
        out=args.out,
        workers=args.workers,
        site=args.site,
        pacs_study=args.study,
        pacs_query=query,
        pacs_auth_file=args.auth_file,
        pacs_workers=args.pacs_workers,
    )
    try:
        result = run(cfg, auth=auth)
    except DicomWebError as exc:  # refused credentials, server gone: no result to summarise
        print(f"umit ingest: error: {exc}", file=sys.stderr)
        return 1
    print_summary(result)
    return 1 if result.failed else 0


def print_summary(result) -> None:
    from umit.ingest.catalog import Catalog
    from umit.ingest.run import failure_line, set_aside_line

    with Catalog(result.catalog) as cat:
        summary = cat.summary()
    print(
        f"ingest: {result.ingested} new item(s), {result.skipped} already done, {result.failed} failed "
        f"in {result.seconds:.1f} s ({result.items_per_second:.2f} items/s) -> {result.out}"
    )
    if result.retrieved:
        mb = result.retrieved_bytes / 1e6
        print(
            f"retrieved: {result.retrieved} series, {mb:.1f} MB over DICOMweb "
            f"({mb / result.seconds if result.seconds > 0 else 0.0:.1f} MB/s including ingest)"
        )
    print(
        f"catalog: {summary['cases']} cases, {summary['series']} series/channels, "
        f"{summary['labeled_cases']} labeled"
    )
    for key in (
        "by_modality",
        "by_source_format",
        "by_split",
        "by_site",
        "by_sex",
        "by_age_band",
        "by_contrast",
    ):
        if summary[key] and set(summary[key]) != {"-"}:
            print(f"  {key[3:]:<14} {json.dumps(summary[key])}")
    if result.set_aside:
        print(
            f"set aside (not failures): localizer images of {len(result.set_aside)} series "
            "(table 'set_aside' in catalog.db)"
        )
    for row in result.set_aside[:20]:
        print(f"  SET ASIDE {set_aside_line(row)}")
    if len(result.set_aside) > 20:
        print(f"  ... and {len(result.set_aside) - 20} more (table 'set_aside' in catalog.db)")
    for f in result.failures[:20]:
        print(f"  FAILED {failure_line(f['source'], f['reason'])}")
    if len(result.failures) > 20:
        print(
            f"  ... and {len(result.failures) - 20} more failures (table 'failures' in catalog.db)"
        )
