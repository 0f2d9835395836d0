"""Case figures: best/median/worst choice, outlines on the mask boundary, radiological orientation."""

from __future__ import annotations

import io

import numpy as np
import pytest

pytest.importorskip("matplotlib")

from umit.eval.case_views import (  # noqa: E402
    PREDICTION_COLOR,
    REFERENCE_COLOR,
    case_figure,
    display_slice,
    draw_view,
    outline_segments,
    pixel_aspect,
    plot_case_views,
    select_cases,
    structure_centre,
    to_ras,
)

PNG = b"\x89PNG\r\n\x1a\n"


def _edges(segs: np.ndarray) -> set[tuple[float, float, float, float]]:
    return {tuple(np.round(s.ravel(), 3)) for s in segs}


def _perimeter(r0: int, r1: int, c0: int, c1: int) -> set[tuple[float, float, float, float]]:
    """Unit edges around pixels rows r0..r1-1, columns c0..c1-1, as (x0, y0, x1, y1)."""
    out = set()
    for r in range(r0, r1):
        for x in (c0 - 0.5, c1 - 0.5):
            out.add((x, r - 0.5, x, r + 0.5))
    for c in range(c0, c1):
        for y in (r0 - 0.5, r1 - 0.5):
            out.add((c - 0.5, y, c + 0.5, y))
    return out


# -- choosing the cases ------------------------------------------------------------------------


def test_select_cases_best_median_worst():
    dice = {"a": 0.71, "b": 0.93, "c": 0.12, "d": 0.55, "e": float("nan"), "f": None, "g": 0.80}
    picks = select_cases(dice)
    assert [(p["role"], p["case_id"]) for p in picks] == [
        ("best", "b"),
        ("median", "a"),  # 5 finite values: 0.93 0.80 [0.71] 0.55 0.12
        ("worst", "c"),
    ]
    assert [p["rank"] for p in picks] == [1, 3, 5] and picks[0]["dice"] == 0.93
    # even count: the lower median; ties go to the smaller case id
    four = select_cases({"w": 0.2, "x": 0.9, "y": 0.5, "z": 0.5})
    assert [(p["role"], p["case_id"]) for p in four] == [
        ("best", "x"),
        ("median", "z"),  # 0.9, 0.5 (y), [0.5 (z)], 0.2
        ("worst", "w"),
    ]
    two = select_cases({"p": 0.3, "q": 0.6})
    assert [(p["role"], p["case_id"]) for p in two] == [("best", "q"), ("median and worst", "p")]
    one = select_cases({"only": 0.5})
    assert [p["role"] for p in one] == ["best, median and worst"]
    assert select_cases({"n": float("nan")}) == []


# -- outlines ------------------------------------------------------------------------------------


def test_outline_of_a_cube_slice_is_its_boundary():
    ref = np.zeros((20, 16, 12), np.uint8)
    ref[4:11, 5:13, 3:9] = 1  # i 4..10, j 5..12, k 3..8
    sl = display_slice(ref, "axial", 5)  # rows: j descending, columns: i descending
    rows, cols = np.nonzero(sl)
    assert (rows.min(), rows.max()) == (16 - 13, 16 - 6) and (cols.min(), cols.max()) == (9, 15)
    segs = outline_segments(sl)
    assert _edges(segs) == _perimeter(rows.min(), rows.max() + 1, cols.min(), cols.max() + 1)
    # every segment separates a mask pixel from a non-mask one (the boundary, nothing else)
    padded = np.pad(sl, 1)
    for (x0, y0), (x1, _y1) in segs:
        if x0 == x1:  # vertical: pixels left and right of x
            a, b = (
                padded[int(y0 + 0.5) + 1, int(x0 - 0.5) + 1],
                padded[int(y0 + 0.5) + 1, int(x0 + 0.5) + 1],
            )
        else:
            a, b = (
                padded[int(y0 - 0.5) + 1, int(x0 + 0.5) + 1],
                padded[int(y0 + 0.5) + 1, int(x0 + 0.5) + 1],
            )
        assert {int(a), int(b)} == {0, 1}
    # an empty slice has no outline; a slice outside the cube neither
    assert len(outline_segments(display_slice(ref, "axial", 0))) == 0


def test_outline_between_two_structures_and_at_the_border():
    lab = np.zeros((4, 6), np.uint8)
    lab[:, :3], lab[:, 3:] = 1, 2  # two structures filling the slice
    e = _edges(outline_segments(lab))
    assert (2.5, -0.5, 2.5, 0.5) in e  # the edge between the two structures
    assert (-0.5, 0.5, -0.5, 1.5) in e and (5.5, 0.5, 5.5, 1.5) in e  # the image border
    assert len(e) == 4 + 2 * 4 + 2 * 6  # the shared edge, the left and right, top and bottom


def _rendered(ref2d, pred2d, px_per_voxel=10):
    """Render a view filling the whole canvas; return the RGB pixels."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    h, w = ref2d.shape
    fig = Figure(figsize=(w * px_per_voxel / 100, h * px_per_voxel / 100), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0, 0, 1, 1))
    draw_view(ax, np.zeros((h, w)), ref2d, pred2d, window=(0.0, 1.0))
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].astype(int)


def _close_to(color: str, rgb: np.ndarray) -> np.ndarray:
    target = np.array([int(color[i : i + 2], 16) for i in (1, 3, 5)])
    return np.abs(rgb - target).sum(-1) < 60


def test_drawn_outlines_lie_on_the_mask_boundaries():
    """The rendered green (reference) and magenta (prediction) pixels trace the boundaries of the
    two squares, to within the line width, and nothing else."""
    ref = np.zeros((20, 20), np.uint8)
    ref[5:12, 4:14] = 1
    pred = np.zeros_like(ref)
    pred[8:16, 9:17] = 1
    rgb = _rendered(ref, pred)  # 10 px per voxel: pixel p spans voxel coordinate p/10 - 0.5
    for mask, color in ((ref, REFERENCE_COLOR), (pred, PREDICTION_COLOR)):
        hit = _close_to(color, rgb)
        assert hit.sum() > 100
        y, x = np.nonzero(hit)
        vy, vx = (y + 0.5) / 10 - 0.5, (x + 0.5) / 10 - 0.5  # voxel coordinates of each pixel
        rows, cols = np.nonzero(mask)
        top, bottom = rows.min() - 0.5, rows.max() + 0.5
        left, right = cols.min() - 0.5, cols.max() + 0.5
        inside = (vx > left - 0.3) & (vx < right + 0.3) & (vy > top - 0.3) & (vy < bottom + 0.3)
        dist = np.minimum.reduce(
            [np.abs(vx - left), np.abs(vx - right), np.abs(vy - top), np.abs(vy - bottom)]
        )
        assert inside.all() and (dist < 0.3).all(), color  # on the boundary, within the line
        for side in (np.abs(vx - left), np.abs(vx - right), np.abs(vy - top), np.abs(vy - bottom)):
            assert (side < 0.3).sum() > 20  # every side is drawn


# -- orientation ---------------------------------------------------------------------------------


def test_display_is_radiological():
    vol = np.zeros((10, 12, 8))
    vol[8, 9, 6] = 1  # patient's right, anterior, superior (RAS voxel axes)
    ax = display_slice(vol, "axial", 6)
    assert ax.shape == (12, 10) and np.argwhere(ax).tolist() == [[12 - 1 - 9, 10 - 1 - 8]]
    # right on the image left (column 1 of 10), anterior at the top (row 2 of 12)
    cor = display_slice(vol, "coronal", 9)
    assert np.argwhere(cor).tolist() == [[8 - 1 - 6, 10 - 1 - 8]]  # superior up, right left
    sag = display_slice(vol, "sagittal", 8)
    assert np.argwhere(sag).tolist() == [[8 - 1 - 6, 12 - 1 - 9]]  # superior up, anterior left
    assert pixel_aspect((0.8, 0.8, 3.0), "coronal") == pytest.approx(3.75)
    assert pixel_aspect((0.8, 0.8, 3.0), "axial") == 1.0
    with pytest.raises(ValueError, match="view must be one of"):
        display_slice(vol, "oblique", 0)


def test_lps_volume_is_reoriented_before_display():
    """The same anatomy stored LPS (DICOM order) lands where the RAS copy does."""
    ras = np.zeros((10, 12, 8))
    ras[8, 9, 6] = 1
    lps = ras[::-1, ::-1, :]  # i towards the patient's left, j towards posterior
    affine = np.diag([-2.0, -2.0, 3.0, 1.0])
    back, spacing = to_ras(lps, affine)
    assert np.array_equal(back, ras) and spacing == (2.0, 2.0, 3.0)


def test_phantom_liver_is_on_the_image_left_in_every_stored_orientation():
    from umit.data.phantoms import make_ct_phantom

    seen = set()
    for seed in (0, 1):  # seed 0 is stored LAS, seed 1 RAS
        ph = make_ct_phantom(seed, shape=(48, 48, 32))
        seen.add(ph.meta.orientation)
        label, _ = to_ras(ph.label, ph.meta.affine)
        liver = structure_centre(label, label, 4)
        sl = display_slice(label, "axial", liver[2])
        cols = {name: np.nonzero(sl == v)[1].mean() for v, name in ((4, "liver"), (5, "spleen"))}
        width = sl.shape[1]
        assert cols["liver"] < width / 2 < cols["spleen"], (seed, cols)
    assert seen == {"LAS", "RAS"}


# -- the figure ----------------------------------------------------------------------------------


def test_case_figure_names_the_case_its_dice_and_the_convention():
    ref = np.zeros((24, 24, 16), np.uint8)
    ref[4:12, 6:16, 4:12] = 1
    ref[14:20, 8:14, 6:10] = 2
    pred = ref.copy()
    pred[pred == 2] = 0
    image = np.random.default_rng(0).normal(size=ref.shape).astype(np.float32)
    pick = {"role": "worst", "case_id": "case_07", "dice": 0.5, "rank": 8}
    fig = case_figure(
        pick, image, pred, ref, dice={1: 1.0, 2: 0.0}, structures={1: "liver", 2: "spleen"},
        spacing=(1.0, 1.0, 2.0), n_cases=8,
    )  # fmt: skip
    assert fig.png.startswith(PNG)
    cap = fig.caption
    assert "Worst case of 8" in cap and "case_07" in cap and "mean Dice 0.500" in cap
    assert "worst structure, spleen (Dice 0.000)" in cap
    assert "patient's right on the image left" in cap and "green" in cap and "magenta" in cap
    from PIL import Image

    w, h = Image.open(io.BytesIO(fig.png)).size
    assert w > 600 and h > 200


def test_plot_case_views_bad_input():
    with pytest.raises(ValueError, match="same 3-D shape"):
        plot_case_views(np.zeros((4, 4, 4)), np.zeros((4, 4, 3)), np.zeros((4, 4, 4)))
    with pytest.raises(ValueError, match="outside the volume"):
        z = np.zeros((4, 4, 4))
        plot_case_views(z, z.astype(int), z.astype(int), centre=(5, 0, 0))
