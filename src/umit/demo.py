"""``umit demo``: the whole pipeline on built-in procedural phantoms, with no data and no network.

phantoms -> ingest -> preprocess -> cross-phase pretraining of a whole UNETR on unlabeled
multiphase exams (a separate pool: every subject scanned in three contrast phases) ->
segmentation fine-tuning with a few training phantoms labeled (a UNETR behind the pretrained
network, frozen, which turns each phantom into all three phases, vs the same UNETR from scratch vs
a residual U-Net CNN) -> evaluation on the held-out test phantoms, overall and per subgroup (site,
sex) -> one HTML report with the comparison, the label-budget curve, subgroup tables and the best,
median and worst test case in three views.

The recipe is the one measured in docs/evidence.md ("Every phase as input": phantom segmentation,
one labeled phantom, 10 paired seeds on 16 test phantoms); the demo runs one seed of it, with a
shorter pretraining. Pretraining and the fine-tuning cells run in ``workers`` single-thread
processes (the pretrained cells start when pretraining is done). Every stage is resumable, so a
second run reuses what the first one finished.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from umit.config import UmitConfig, build_config, deep_merge, load_yaml, save_config
from umit.data.phantoms.stage import PhantomsConfig
from umit.data.phantoms.stage import run as make_phantoms
from umit.data.store import Store
from umit.eval.data_efficiency import (
    DataEfficiencyConfig,
    cell_ci,
    cell_dir,
    cell_pool,
    label_efficiency_figure,
    make_budgets,
    pool_size,
    run_cell,
)
from umit.eval.data_efficiency import run as data_efficiency
from umit.eval.evaluate import EvaluateConfig, case_section, structure_names, structure_table
from umit.eval.evaluate import run as evaluate
from umit.eval.explain_views import explain_section
from umit.eval.paired import read_per_case
from umit.eval.report import Section, Table, display_names, subgroup_section, write_report
from umit.ingest.catalog import CATALOG_NAME, Catalog
from umit.ingest.run import IngestConfig
from umit.ingest.run import run as ingest
from umit.preprocess.run import PreprocessConfig
from umit.preprocess.run import run as preprocess
from umit.ssl.pretrain import PretrainConfig
from umit.ssl.pretrain import run as pretrain
from umit.train.checkpoint import load_model

PRETRAINED, SCRATCH, CNN = "UNETR + cross-phase front", "UNETR scratch", "ResUNet (CNN)"
ALL = 1_000_000_000
"""A label count at least the training pool: every training phantom labeled."""


class DemoConfig(UmitConfig):
    """Settings of ``umit demo`` (defaults sized for under 10 minutes on 2 CPU cores)."""

    out: Path = Path("demo_out")
    """Folder for everything the demo writes."""
    n_train: int = Field(default=200, ge=4)
    """CT phantoms for fine-tuning: ``labeled`` of them with their labels."""
    n_pool: int = Field(default=100, ge=2)
    """Unlabeled multiphase exams for pretraining (each subject in the none, arterial and
    portal phases: 3 series), a separate collection with no subject of the others (unlabeled
    scans are cheap, labels are not)."""
    n_test: int = Field(default=8, ge=2)
    """Held-out test phantoms (reference labels used for scoring only)."""
    labeled: list[int | Literal["all"]] = Field(default_factory=lambda: [1, 20])
    """Label budgets: numbers of labeled training phantoms (``all``: every one). With one labeled
    phantom most test phantoms are in a contrast phase it does not show, which is what
    cross-phase pretraining helps with (docs/evidence.md); at 2 it did not beat scratch on
    held-out phantoms. ``all`` (190) is not a better default: at the fixed 300 fine-tuning steps
    UNETR underfits 190 varied phantoms (test Dice 0.63-0.66 against 0.77 with 20; the CNN
    0.885)."""
    shape: tuple[int, int, int] = (64, 64, 48)
    """Phantom grid at the reference spacing."""
    target_spacing: tuple[float, float, float] = (1.6, 1.6, 2.0)
    """Preprocessing spacing: volumes of about 48^3 voxels, so kidneys, spleen and aorta have
    ~150-300 voxels each (at 2.5 x 2.5 x 3 mm they had ~60-80 and no model learned them)."""
    scheme: str = "ct_zscore"
    """CT intensity scheme: clip to the foreground [p0.5, p99.5] HU (about -900..420) and z-score.
    Keeps lung and bone, and gives soft tissue 2.4x the spread of ``ct_window``, which maps that
    range to [-1, 1] (17 HU, kidney vs. visceral tissue in the phantom: 0.026; z-scored: 0.062)."""
    crop_size: tuple[int, int, int] = (32, 32, 32)
    """Training crop and sliding-window ROI (about 2/3 of the volume per axis, enough context to
    tell left from right organs; 8 windows per test volume)."""
    encoder: str = "vit3d_tiny_p8"
    """ViT encoder of the UNETR."""
    feature_size: int = Field(default=16, ge=1)
    """UNETR decoder width. The decider for small organs: with 8, spleen and kidneys stayed at
    Dice 0 (mean 0.49); with 16, spleen 0.70, kidneys 0.78 / 0.62, mean 0.82 (scratch, 300 steps;
    a fine-tuning step costs ~1.75x)."""
    pretrain_steps: int = Field(default=300, ge=1)
    """Cross-phase pretraining steps of batch 4 (the study ran 1,200; a whole UNETR step costs
    ~0.5 s on one thread in bf16)."""
    finetune_steps: int = Field(default=300, ge=1)
    """Fine-tuning steps per model and label budget, the same for every arm (small organs
    appear only after a few hundred steps; 60 steps learned body, lungs and liver only)."""
    finetune_lr: float = Field(default=3e-3, gt=0)
    """Peak fine-tuning learning rate (cosine decay; 1e-3 left the loss at 1.56 after 300 steps,
    3e-3 reached 1.06)."""
    ce_weight: float = Field(default=0.03, ge=0)
    """Weight of cross-entropy in the Dice + CE fine-tuning loss. Voxel-averaged CE is dominated
    by body, lungs and liver: with weight 1 or 0.1, spleen, kidneys, spine and aorta stayed at
    Dice 0 after 300 steps; Dice only (0) found spine and aorta (0.84, 0.73) but lost the left
    lung; 0.03 kept the lungs and found the spine (0.75)."""
    foreground_prob: float = Field(default=1.0, ge=0, le=1)
    """Share of training crops centred on a labelled structure (class drawn uniformly), so the
    small organs are in most crops."""
    seed: int = 0
    """Seed of everything (the demo is deterministic: one torch thread per process)."""
    workers: int = Field(default=2, ge=1)
    """Processes for phantom generation, ingest, preprocessing, pretraining and fine-tuning."""


def _num(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def _stage(name: str, t0: float) -> None:
    print(f"[demo] {name} done ({time.perf_counter() - t0:.0f} s elapsed)", flush=True)


PRETRAIN_PRESET = "configs/pretrain/cross_phase_unetr_phantoms.yaml"
EXPERIMENT_PRESET = "configs/experiments/phantom_seg_evidence.yaml"
"""The recipe of the phantom segmentation study in docs/evidence.md: the demo runs it at one seed."""


def pretrain_config(cfg: DemoConfig, pool: Path, out: Path) -> PretrainConfig:
    """Cross-phase pretraining of the whole UNETR on the multiphase pool (the preset, with the
    demo's sizes)."""
    steps = cfg.pretrain_steps
    return build_config(
        PretrainConfig,
        PRETRAIN_PRESET,
        None,
        data=pool,
        out=out,
        model_args={"encoder": cfg.encoder, "feature_size": cfg.feature_size},
        crop_size=cfg.crop_size,
        val_cases=min(8, max(1, cfg.n_pool // 10)),
        train={
            "total_steps": steps,
            "warmup_steps": max(1, steps // 10),
            "eval_every": max(1, steps // 3),
            "ckpt_every": steps,
            "seed": cfg.seed,
            "resume": "auto",
            "progress": False,
        },
    )


def experiment_config(cfg: DemoConfig, prep: Path, network: Path) -> DataEfficiencyConfig:
    """The three arms at the label budgets, fine-tuned with the study's recipe."""
    unetr_args = {"encoder": cfg.encoder, "feature_size": cfg.feature_size}
    steps = cfg.finetune_steps
    finetune = deep_merge(
        load_yaml(EXPERIMENT_PRESET)["finetune"],
        {
            "crop_size": cfg.crop_size,
            "foreground_prob": cfg.foreground_prob,
            "ce_weight": cfg.ce_weight,
            "train": {
                "total_steps": steps,
                "lr": cfg.finetune_lr,
                "warmup_steps": max(1, steps // 10),
                "eval_every": steps,
                "ckpt_every": steps,
            },
        },
    )
    return DataEfficiencyConfig.model_validate(
        {
            "data": prep,
            "out": cfg.out / "finetune",
            "counts": [ALL if k == "all" else k for k in cfg.labeled],
            "seeds": [cfg.seed],
            "n_boot": 200,
            "workers": cfg.workers,
            "arms": {
                PRETRAINED: {  # behind the pretrained network, frozen (finetune.harmonise)
                    "model": "unetr",
                    "model_args": unetr_args,
                    "finetune": {"harmonise": network},
                },
                SCRATCH: {"model": "unetr", "model_args": unetr_args},
                CNN: {"model": "resunet3d", "model_args": {"features": [16, 32, 64, 128]}},
            },
            "finetune": finetune,
        }
    )


def pretrain_and_finetune(
    cfg: DemoConfig, prep: Path, pool: Path
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Pretraining and every fine-tuning cell in ``cfg.workers`` processes: the scratch and
    CNN cells run beside the pretraining, the pretrained cells as soon as it is done. Then the
    table, comparisons and curve of all cells (``umit data-efficiency``, tabulating only)."""
    pt_cfg = pretrain_config(cfg, pool, cfg.out / "pretrain")
    de_cfg = experiment_config(cfg, prep, pt_cfg.out / "network.pt")
    budgets = make_budgets(de_cfg, pool_size(de_cfg, Store(prep)))
    cells = lambda arms: [(a, b, cfg.seed) for b in budgets for a in arms]  # noqa: E731
    if cfg.workers <= 1:
        pt = pretrain(pt_cfg)
        for a, b, s in cells([PRETRAINED, SCRATCH, CNN]):
            run_cell(de_cfg, a, de_cfg.arms[a], b, s)
    else:
        with cell_pool(cfg.workers) as pool:
            pt_future = pool.submit(pretrain, pt_cfg)
            futures = [
                pool.submit(run_cell, de_cfg, a, de_cfg.arms[a], b, s)
                for a, b, s in cells([SCRATCH, CNN])
            ]
            pt = pt_future.result()
            futures += [
                pool.submit(run_cell, de_cfg, a, de_cfg.arms[a], b, s)
                for a, b, s in cells([PRETRAINED])
            ]
            for f in futures:
                f.result()
    de = data_efficiency(de_cfg.model_copy(update={"tabulate_only": True}))
    de["budgets"] = budgets
    return pt, de


def pretraining_pool(cfg: DemoConfig, prep: Path) -> Path:
    """``n_pool`` unlabeled multiphase exams (collection seed ``seed + 1``: no subject of the
    fine-tuning or test phantoms), preprocessed with the fine-tuning store's plan so that both
    are normalised alike. Returns its PREP folder."""
    src, raw, out = cfg.out / "pool_phantoms", cfg.out / "pool_raw", cfg.out / "pool_prep"
    make_phantoms(
        PhantomsConfig(
            out=src,
            n=cfg.n_pool,
            modality="ct",
            seed=cfg.seed + 1,
            shape=cfg.shape,
            workers=cfg.workers,
            phases=["none", "arterial", "portal"],
        )
    )
    ingest(IngestConfig(src=src, out=raw, workers=cfg.workers))
    preprocess(
        PreprocessConfig(raw=raw, out=out, workers=cfg.workers, plan_file=prep / "plan.json")
    )
    return out


def run(cfg: DemoConfig) -> dict[str, Any]:
    """Run every stage; returns a summary with the report path."""

    t0 = time.perf_counter()
    out = cfg.out
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out)
    src, raw, prep = out / "phantoms", out / "raw", out / "prep"
    make_phantoms(
        PhantomsConfig(
            out=src,
            n=cfg.n_train,
            n_test=cfg.n_test,
            modality="ct",
            seed=cfg.seed,
            shape=cfg.shape,
            workers=cfg.workers,
        )
    )
    _stage("phantoms", t0)
    ing = ingest(IngestConfig(src=src, out=raw, workers=cfg.workers))
    _stage("ingest", t0)
    pre = preprocess(
        PreprocessConfig(
            raw=raw,
            out=prep,
            workers=cfg.workers,
            target_spacing=cfg.target_spacing,
            scheme=cfg.scheme,
        )
    )
    _stage("preprocess", t0)
    pool = pretraining_pool(cfg, prep)
    _stage("multiphase pretraining pool", t0)
    with Catalog(raw / CATALOG_NAME) as cat:
        catalog = cat.summary()
    pt, de = pretrain_and_finetune(cfg, prep, pool)
    _stage("pretrain + fine-tune + evaluate", t0)
    report = write_demo_report(cfg, out, catalog, pre, pt, de)
    summary = {
        "out": str(out),
        "seconds": round(time.perf_counter() - t0, 1),
        "catalog": catalog,
        "ingest_failed": ing.failed,
        "preprocess_failed": pre.failed,
        "pretrain": pt,
        "table": de["table"],
        "report": str(report),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary


def write_demo_report(
    cfg: DemoConfig, out: Path, catalog: dict, pre: Any, pt: dict, de: dict
) -> Path:
    """One HTML page: pipeline figures, comparison table and curve, subgroups, overlays."""

    budgets = de["budgets"]
    sections = [
        Section(
            title="Data",
            text=(
                f"{catalog['cases']} CT phantoms ingested ({catalog['failures']} failures), "
                f"{pre.done + pre.skipped} preprocessed to {cfg.target_spacing} mm. "
                f"Sites {catalog['by_site']}, sex {catalog['by_sex']}, contrast {catalog['by_contrast']}."
            ),
        ),
        Section(
            title="Self-supervised pretraining (cross-phase prediction)",
            text=(
                f"The whole UNETR ({cfg.encoder} encoder), {pt['steps']} steps on "
                f"{pt['train_cases']} unlabeled series of {cfg.n_pool} multiphase exams "
                "(a separate pool: every subject in the none, arterial and portal phases): from "
                "one phase of a crop, predict all three. Validation loss "
                f"{_num(pt.get('initial_val_loss'))} -> {_num(pt.get('last_val_loss'))} "
                "(copying the input into every phase: "
                f"{_num((pt.get('last_eval') or {}).get('val_baseline_loss'))}). "
                f'Fine-tuning puts it, frozen, in front of a fresh UNETR ("{PRETRAINED}"): '
                "each phantom becomes the three phases it predicts, so a phantom of any phase "
                "gives the segmenter much the same input."
            ),
        ),
    ]
    table = de["table"]
    store = Store(out / "prep")
    structures = dict(
        sorted((int(v), k) for k, v in (store.plan.labels or {}).items() if int(v) > 0)
    )

    def cell(arm: str, b: Any) -> str:
        c = table.get(arm, {}).get(b.key)
        if c is None or not c["n"]:
            return "-"
        ci = cell_ci(out / "finetune", arm, b, cfg.seed, "dice")
        return f"{c['mean']:.3f}" + ("" if ci is None else f" [{ci[0]:.3f}, {ci[1]:.3f}]")

    curve = label_efficiency_figure(
        out / "finetune", de["cells"], budgets, "dice", xlabel="labeled training phantoms"
    )
    sections.append(
        Section(
            title="Segmentation with few labels: test Dice",
            text=(
                f"Dice on the held-out test phantoms, averaged over the {len(structures)} "
                f"structures ({', '.join(structures.values())}), one seed; in brackets the 95% "
                "bootstrap CI over test phantoms. The same recipe with 5 paired seeds, 16 test "
                "phantoms and one labeled phantom is in docs/evidence.md (umit data-efficiency "
                "--config configs/experiments/phantom_seg_one_label_evidence.yaml)."
            ),
            tables=[
                Table(
                    header=["model"] + [f"{b.size} labeled" for b in budgets],
                    rows=[[arm] + [cell(arm, b) for b in budgets] for arm in table],
                )
            ],
            figures=[curve] if curve is not None else [],
        )
    )
    # per structure, subgroups and case figures of the pretrained model with the fewest labels
    fewest = budgets[0]
    best_model = cell_dir(out / "finetune", PRETRAINED, fewest, cfg.seed) / "run" / "best.pt"
    ev = evaluate(
        EvaluateConfig(
            model=best_model,
            data=out / "prep",
            out=out / "eval_pretrained",
            attributes=["site", "sex"],
            n_boot=500,
            min_group_size=5,
            case_figures=False,  # drawn below for this page
            explain_figures=False,
        )
    )
    model, ckpt = load_model(best_model)
    names = structure_names(ckpt, store)
    rows = read_per_case(out / "eval_pretrained" / "per_case.csv")
    who = f"UNETR behind the cross-phase front, {fewest.size} labeled phantoms"
    sections.append(
        Section(
            title=f"Per structure: {who}",
            text="Its full evaluation report: eval_pretrained/report.html.",
            tables=[structure_table(ev["result"], rows, names)],
        )
    )
    cases = case_section(model, ckpt, store, rows, names)
    if cases is not None:
        cases.title = f"Best, median and worst test phantom: {who}"
        sections.append(cases)
    looked = explain_section(model, ckpt, best_model, store, rows, names)
    if looked is not None:
        looked.title = f"Where the model looked: {who}"
        sections.append(looked)
    sections.append(
        subgroup_section(
            ev["result"],
            title=f"Subgroups: {who}",
            names=display_names(list(ev["result"]["overall"]), names),
            metrics=["dice", "hd95", "nsd"],
            text="Per-structure results per subgroup are in eval_pretrained/subgroups.csv.",
        )
    )
    paths = write_report(out, "UMIT demo report", sections)
    return paths["html"]
