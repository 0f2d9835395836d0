"""Stack checks: splitting a series into stacks, slice ordering and spacing checks.

At discovery, ``_split_group`` splits one SeriesInstanceUID's files into stacks of one
orientation and image size and sets localizers aside (flagged ones, scouts and small orientation
minorities), reporting them as a :class:`~umit.ingest.dicom.series.SetAside`. At load time
the checks here make sure one stack is one volume: one image size, orientation and PixelSpacing;
slices ordered by position along the normal (never by file name or InstanceNumber), with several
images per position ordered into time points (4D); uniform slice spacing (missing slices are
named); slice positions on one line.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path

import numpy as np

from umit.errors import GeometryError, InputError
from umit.ingest.dicom.frames import _Frame
from umit.ingest.dicom.series import DicomSeries, SeriesList, SetAside, _Header

logger = logging.getLogger(__name__)


IOP_TOLERANCE = 1e-3
"""Direction cosines that differ by less than this belong to the same orientation."""
POSITION_TOLERANCE_MM = 1e-2
"""Slices closer than this along the normal share a position (a 4D series)."""
LOCALIZER_MAX_SLICES = 3
"""A series in several orientations with at most this many images in each is a scout; beside a
volume, stacks of fewer images in another orientation are localizer-like. Both are set aside
(and reported), as are stacks flagged LOCALIZER of any size."""


def _iop_tag(iop: np.ndarray | None) -> str:
    if iop is None:
        return "no-orientation"
    return ",".join(f"{round(float(v), 3) + 0.0:.3f}" for v in iop)


@dataclass
class _Stack:
    iop: np.ndarray | None
    rows: int
    cols: int
    localizer: bool
    members: list[_Header] = field(default_factory=list)

    def accepts(self, h: _Header) -> bool:
        if (h.rows, h.cols, h.localizer) != (self.rows, self.cols, self.localizer):
            return False
        if self.iop is None or h.iop is None:
            return self.iop is None and h.iop is None
        return bool(np.max(np.abs(self.iop - h.iop)) < IOP_TOLERANCE)

    @property
    def tag(self) -> str:
        return f"{self.rows}x{self.cols}|{_iop_tag(self.iop)}" + (
            "|localizer" if self.localizer else ""
        )


def _split_group(headers: list[_Header], result: SeriesList) -> list[DicomSeries]:
    """Split one SeriesInstanceUID's files into stacks; set localizers aside and report them."""
    first = headers[0]
    skipped: list[tuple[Path, str]] = []
    # Exact duplicates (the same SOP instance copied twice) would look like a 4D series.
    seen: dict[str, Path] = {}
    unique: list[_Header] = []
    for h in headers:
        if h.sop_uid in seen:
            skipped.append((h.path, f"duplicate of {seen[h.sop_uid].name} (same SOP instance)"))
        else:
            seen[h.sop_uid] = h.path
            unique.append(h)

    stacks: list[_Stack] = []
    multiframes: list[_Header] = []
    for h in unique:
        if h.multiframe:
            multiframes.append(h)
            continue
        for s in stacks:
            if s.accepts(h):
                s.members.append(h)
                break
        else:
            stacks.append(_Stack(h.iop, h.rows, h.cols, h.localizer, [h]))

    kept, localizers = _sort_out_localizers(stacks)
    for s, reason in localizers:
        skipped.extend((h.path, reason) for h in s.members)

    out: list[DicomSeries] = []
    for s in kept:
        out.append(
            DicomSeries(
                series_uid=first.series_uid,
                study_uid=first.study_uid,
                patient_key=first.patient_id,
                accession_key=first.accession,
                files=[h.path for h in s.members],
                modality=first.modality,
                description=first.description,
                n_slices=len(s.members),
                stack_tag=s.tag,
                series_number=first.series_number,
                burned_in=[(h.path, h.burned_in) for h in s.members if h.burned_in],
            )
        )
    for h in multiframes:
        out.append(
            DicomSeries(
                series_uid=h.series_uid,
                study_uid=h.study_uid,
                patient_key=h.patient_id,
                accession_key=h.accession,
                files=[h.path],
                modality=h.modality,
                description=h.description,
                n_slices=h.n_frames,
                stack_tag=f"multiframe|{h.sop_uid}",
                multiframe=True,
                series_number=h.series_number,
                burned_in=[(h.path, h.burned_in)] if h.burned_in else [],
            )
        )
    if out:
        # The main (largest) stack reports what was left out of its series.
        target = max(out, key=lambda s: s.n_slices)
        target.skipped.extend(skipped)
    else:
        result.skipped.extend(skipped)
    if localizers:
        result.set_aside.append(_set_aside(first, localizers, whole_series=not out))
    return out


def _same_orientation(a: _Stack, b: _Stack) -> bool:
    """Both stacks have an orientation and it is the same (within :data:`IOP_TOLERANCE`)."""
    if a.iop is None or b.iop is None:
        return False
    return bool(np.max(np.abs(a.iop - b.iop)) < IOP_TOLERANCE)


def _sort_out_localizers(stacks: list[_Stack]) -> tuple[list[_Stack], list[tuple[_Stack, str]]]:
    """Split stacks into those to load and localizers ``(stack, reason)``.

    Localizers (scouts) are: stacks flagged LOCALIZER in ImageType, whatever their size; a series
    in several orientations with at most :data:`LOCALIZER_MAX_SLICES` images in each (an
    unflagged scout, e.g. one image per plane); and, beside a main stack, stacks of fewer than
    :data:`LOCALIZER_MAX_SLICES` images in another orientation (localizer-like minorities).
    """
    regular = [s for s in stacks if not s.localizer]
    main = max(regular, key=lambda s: len(s.members)) if regular else None
    scout = any(not _same_orientation(s, regular[0]) for s in regular[1:]) and all(
        len(s.members) <= LOCALIZER_MAX_SLICES for s in regular
    )
    kept: list[_Stack] = []
    localizers: list[tuple[_Stack, str]] = []
    for s in stacks:
        n = len(s.members)
        if s.localizer:
            reason = f"localizer (ImageType LOCALIZER), {n} image(s) of size {s.cols}x{s.rows}"
        elif scout:
            reason = (
                f"localizer-like: {n} image(s) in one of several orientations of this series, "
                f"none with more than {LOCALIZER_MAX_SLICES} images"
            )
        elif (
            n < LOCALIZER_MAX_SLICES
            and main is not None
            and s is not main
            and not _same_orientation(s, main)
        ):
            reason = (
                f"orientation minority (localizer-like): {n} image(s) with orientation "
                f"[{_iop_tag(s.iop)}] unlike the main stack's [{_iop_tag(main.iop)}] "
                f"({len(main.members)} images)"
            )
        else:
            kept.append(s)
            continue
        localizers.append((s, reason))
    return kept, localizers


def _set_aside(
    first: _Header, localizers: list[tuple[_Stack, str]], whole_series: bool
) -> SetAside:
    """One report of a series' localizer stacks: their files and one reason for them all."""
    files = [h.path for s, _ in localizers for h in s.members]
    flagged = sum(len(s.members) for s, _ in localizers if s.localizer)
    unflagged = len(files) - flagged
    parts = []
    if flagged:
        parts.append(f"{flagged} image(s) with ImageType LOCALIZER")
    if unflagged and whole_series:
        parts.append(
            f"{unflagged} image(s) in different orientations, at most {LOCALIZER_MAX_SLICES} per "
            "orientation: too few for a volume"
        )
    elif unflagged:
        parts.append(f"{unflagged} image(s) in another orientation than the series' volume")
    return SetAside(
        series_uid=first.series_uid,
        series_number=first.series_number,
        modality=first.modality,
        files=files,
        reason="localizer: " + "; ".join(parts),
        whole_series=whole_series,
    )


def _check_image_sizes(pixels: list[np.ndarray], where: Path) -> None:
    """Every image of the stack has the same size (rows, columns[, samples])."""
    shapes = {p.shape for p in pixels}
    if len(shapes) > 1:
        raise GeometryError(where, f"images of different sizes in one stack: {sorted(shapes)}")


def _check_one_plane(frames: list[_Frame], where: Path) -> None:
    """Every image has the first one's orientation and in-plane PixelSpacing."""
    iop0 = frames[0].iop
    dev_iop = max(float(np.max(np.abs(f.iop - iop0))) for f in frames)
    if dev_iop > IOP_TOLERANCE:
        raise GeometryError(
            where, f"slices have different orientations (direction cosines differ by {dev_iop:.3g})"
        )
    sp0 = np.asarray(frames[0].spacing)
    if any(not np.allclose(f.spacing, sp0, rtol=1e-3, atol=0) for f in frames):
        found = sorted({tuple(round(v, 5) for v in f.spacing) for f in frames})
        raise GeometryError(where, f"slices have different PixelSpacing: {found}")


def _position_groups(d: np.ndarray) -> list[np.ndarray]:
    """Indices of frames grouped by position along the normal (ascending), ``d`` unsorted."""
    order = np.argsort(d, kind="stable")
    groups: list[list[int]] = [[int(order[0])]]
    for prev, cur in pairwise(order):
        if d[cur] - d[prev] > POSITION_TOLERANCE_MM:
            groups.append([])
        groups[-1].append(int(cur))
    return [np.asarray(g) for g in groups]


def _order_4d(
    frames: list[_Frame], groups: list[np.ndarray], where: str | Path
) -> list[np.ndarray]:
    """Order the images at each position into time points; check the pattern is consistent."""
    counts = [len(g) for g in groups]
    n_t = counts[0]
    if len(set(counts)) > 1:
        histogram = Counter(counts)
        dup = [g for g in groups if len(g) > 1]
        if histogram.get(1, 0) >= len(groups) / 2:
            example = ", ".join(frames[i].label for i in dup[0][:3])
            raise GeometryError(
                where,
                f"duplicate slice positions: {len(dup)} of {len(groups)} positions hold more than "
                f"one image (e.g. {example}) and this is no 4D pattern",
            )
        raise GeometryError(
            where,
            "inconsistent number of images per slice position (a 4D series needs the same count "
            f"at every position): counts {dict(sorted(histogram.items()))}",
        )

    def key(i: int) -> tuple[float, ...]:
        f = frames[i]
        return tuple(0.0 if v is None else v for v in (f.temporal, f.acq_time, f.echo, f.instance))

    ordered = [np.asarray(sorted(g.tolist(), key=key)) for g in groups]
    temporal = [[frames[i].temporal for i in g] for g in ordered]
    if all(v is not None for row in temporal for v in row):
        for t in range(n_t):
            if len({row[t] for row in temporal}) > 1:
                raise GeometryError(
                    where, f"4D series: time point {t + 1} mixes temporal positions across slices"
                )
    return ordered


def _group_slices(
    frames: list[_Frame], normal: np.ndarray, where: Path
) -> tuple[list[np.ndarray], bool]:
    """Frame indices per slice position, ascending along ``normal``, and whether the stack is 4D.

    In a 4D stack each position's frames are ordered into time points (:func:`_order_4d`).
    A stack with a single position is a 2D image, not a volume (:class:`InputError`).
    """
    d = np.asarray([float(f.ipp @ normal) for f in frames])
    groups = _position_groups(d)
    if len(groups) < 2:
        raise InputError(
            where,
            f"2D image, expected a 3D volume: all {len(frames)} image(s) lie at one slice position",
        )
    is_4d = any(len(g) > 1 for g in groups)
    if is_4d:
        groups = _order_4d(frames, groups, where)
    return groups, is_4d


@dataclass(frozen=True)
class SpacingRun:
    """Consecutive slices with one spacing: slices ``first`` to ``last`` are ``spacing`` apart."""

    spacing: float
    first: int
    last: int


def spacing_runs(pos: np.ndarray, max_relative_deviation: float) -> list[SpacingRun]:
    """Split the steps between the sorted slice positions ``pos`` into runs of one spacing.

    A step joins the current run while it deviates from the run's mean step by at most
    ``max_relative_deviation``; e.g. 13 slices 4.2 mm apart then 13 slices 7.4 mm apart give
    ``[SpacingRun(4.2, 0, 12), SpacingRun(7.4, 12, 25)]`` (slice 12 ends one run, starts the next).
    """
    steps = np.diff(pos)
    runs: list[SpacingRun] = []
    start = 0
    for k in range(1, len(steps) + 1):
        mean = float(np.mean(steps[start:k]))
        if k == len(steps) or abs(steps[k] - mean) > max_relative_deviation * mean:
            runs.append(SpacingRun(mean, start, k))
            start = k
    return runs


def _mm(value: float) -> str:
    """A spacing for messages: two decimals (4.20), three where two would round it (0.625)."""
    return f"{value:.2f}" if abs(value - round(value, 2)) < 5e-4 else f"{value:.3f}"


def describe_runs(runs: list[SpacingRun], limit: int = 6) -> str:
    """``"4.20 mm for slices 0-12, 7.40 mm for slices 12-25"`` (the first ``limit`` runs)."""
    text = ", ".join(f"{_mm(r.spacing)} mm for slices {r.first}-{r.last}" for r in runs[:limit])
    more = len(runs) - limit
    return text + (f", and {more} more change(s)" if more > 0 else "")


def _check_slice_spacing(
    pos: np.ndarray,
    max_relative_deviation: float,
    where: Path,
    series_number: int | None,
    *,
    allow_nonuniform: bool = False,
) -> float:
    """Check the steps between the slice positions ``pos`` (mm along the normal) are uniform.

    A step that is a whole multiple of the usual one is reported as missing slices, any other
    deviation above ``max_relative_deviation`` as non-uniform spacing: the error names where
    the spacing changes and the option that resamples, unless ``allow_nonuniform`` (the caller
    resamples). Missing slices are an error either way: resampling would invent them.

    Returns:
        The largest relative deviation of a step from the median step.
    """
    steps = np.diff(pos)
    median = float(np.median(steps))
    rel = np.abs(steps - median) / median
    deviation = float(rel.max())
    # SeriesNumber, not SeriesDescription: this message can land in the catalog's failure rows,
    # and the Basic Profile removes SeriesDescription (umit.deid.allowlist).
    desc = f" (series number {series_number})" if series_number is not None else ""
    if deviation > max_relative_deviation:
        ratio = steps / median
        whole = np.rint(ratio)
        if np.all(np.abs(ratio - whole) <= 0.1) and np.any(whole >= 2):
            gaps = np.flatnonzero(whole >= 2)
            where_gaps = "; ".join(
                f"{pos[g]:.3f} and {pos[g + 1]:.3f} mm (gap {steps[g]:.3f} mm, "
                f"~{int(whole[g]) - 1} missing)"
                for g in gaps[:5]
            )
            raise GeometryError(
                where,
                f"missing slice(s) between positions {where_gaps} along the slice normal; "
                f"the usual spacing is {median:.4g} mm{desc}",
            )
        if allow_nonuniform:
            return deviation
        runs = spacing_runs(pos, max_relative_deviation)
        smallest = min(r.spacing for r in runs)
        raise GeometryError(
            where,
            f"non-uniform slice spacing{desc}: slice spacing changes: {describe_runs(runs)} "
            f"(max deviation from the median {median:.4g} mm: {deviation:.2%} > "
            f"{max_relative_deviation:.2%}); set resample_nonuniform=true to resample onto a "
            f"uniform grid at the smallest spacing, {_mm(smallest)} mm",
        )
    return deviation


def _warn_spacing_jitter(
    where: Path, deviation: float, max_relative_deviation: float, step: np.ndarray
) -> None:
    """Warn when the accepted slice spacing still varies (the mean ``step`` is used)."""
    if deviation > 1e-4:
        logger.warning(
            "%s: slice spacing varies by up to %.3f%% (limit %.3f%%); using the mean step %.5g mm",
            where,
            100 * deviation,
            100 * max_relative_deviation,
            float(np.linalg.norm(step)),
        )


def _check_aligned(
    ipps: np.ndarray,
    pos: np.ndarray,
    normal: np.ndarray,
    pixel_spacing: tuple[float, float],
    where: Path,
) -> None:
    """The slices lie on a line: a gantry tilt is fine, a jump sideways is not.

    Args:
        ipps: Slice positions (K, 3), LPS mm.
        pos: Their distances along ``normal``.
        normal: Unit slice normal.
        pixel_spacing: PixelSpacing; a sideways deviation over a quarter of the finer one fails.
        where: Folder named in the error.
    """
    lateral = ipps - np.outer(pos, normal)
    fit = lateral[0] + np.outer((pos - pos[0]) / (pos[-1] - pos[0]), lateral[-1] - lateral[0])
    off = float(np.max(np.linalg.norm(lateral - fit, axis=1)))
    if off > 0.25 * float(min(pixel_spacing)):
        raise GeometryError(
            where,
            f"slices are not aligned: in-plane positions deviate up to {off:.3f} mm from a line",
        )
