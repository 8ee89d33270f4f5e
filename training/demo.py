"""`demo`: the three-scene test end to end, in one call.

The subject's photos (the bundled sample by default) -> a prepared dataset -> class images -> LoRA and DreamBooth
training (LoRA at rank 16 and at rank 4) -> the rank-16 LoRA resized to rank 4 as well -> the three scenes from
every model ->
scores against the photos -> one Markdown report. On `tiny` it takes about a minute on a
laptop CPU and the pictures are noise; with a real SD1.5 file the defaults are a real run.
A re-run into the same folder reuses the trained models and the class images.

Layout of the output folder:
    report.md                         the report (relative links to everything below)
    dataset_<res>px/                  crops, captions, contact_sheet.png
    class_images/                     the prior-preservation cache
    models/<method>_..._<steps>steps.safetensors (+ .run/ with loss.png), ..._resized_r4.safetensors
    images/<model>[_r<rank>]_<scene>_<seed>.png, prompts.json   (model: base, dreambooth, lora, lora-resized)
    evaluation/report.json, table.txt, grid.png, chart.png
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

import torch

from .errors import UserError
from .eval import DEFAULT_FACE_DETECTOR
from .eval.report import group_key, group_name
from .models import SDModel, load_model
from .progress import Progress, ProgressFn, no_progress
from .safe_io import atomic_write_text
from .prompts import SEED_NEGATIVE, scene_prompts

if TYPE_CHECKING:
    from .data import DatasetReport
    from .eval.report import EvalReport

SAMPLE_PHOTOS = Path(__file__).resolve().parent / "sample_data" / "subject"
REAL_BASE_FLAG = "--base path/to/v1-5-pruned-emaonly.safetensors"
NOISE_NOTE = ("`tiny` has random weights, so its pictures are noise: this run shows the pipeline, not a likeness. "
              f"For real pictures point it at an SD1.5 file: `python -m training demo {REAL_BASE_FLAG}`")
NO_FACE_ON_NOISE = ("Pictures from tiny are noise, so no face is expected: "
                    "\"no face found\" everywhere is the honest result.")
# What the demo trains on a real base: the trainer's defaults, except DreamBooth's learning rate and
# schedule, which are the seed's (2e-5, linear) so the comparison repeats its experiment.
DREAMBOOTH_LR, DREAMBOOTH_SCHEDULER = 2e-5, "linear"
TINY_DEFAULTS = {"steps": 200, "class_images": 8, "sample_steps": 20}
REAL_DEFAULTS = {"steps": None, "class_images": 100, "sample_steps": 30}
QUICK = {"steps": 20, "class_images": 4, "sample_steps": 8}


@dataclass
class DemoConfig:
    """What the demo runs; `None` fields take the defaults of the base (tiny: small, real: a real run)."""

    base: str = "tiny"
    steps: int | None = None  # tiny: 200; real base: the trainer's (LoRA 800, DreamBooth 400)
    methods: tuple[str, ...] = ("lora", "dreambooth")
    lora_ranks: tuple[int, ...] = (16, 4)  # a LoRA trained at each; 4 is the seed's rank
    resized_ranks: tuple[int, ...] = (4,)  # the first LoRA resized (SVD, no training) to each: beside the trained one
    class_images: int | None = None  # tiny: 8; real base: 100
    sample_steps: int | None = None  # sampler steps per picture; tiny: 20, real base: 30
    with_base: bool = True  # also render the untrained base: the control for every other row
    photos: str = str(SAMPLE_PHOTOS)
    token: str = "sks"
    class_word: str = "man"
    seed: int = 0
    clip: str | None = None
    dino: str | None = None
    face_detector: str = DEFAULT_FACE_DETECTOR

    @classmethod
    def quick(cls, **overrides) -> "DemoConfig":
        """LoRA only, few steps, few class images: the smoke test of the whole pipeline, on any base."""
        return cls(**({"methods": ("lora",)} | QUICK | overrides))

    def validate(self) -> "DemoConfig":
        if self.steps is not None and self.steps < 1:
            raise UserError(f"--steps {self.steps} must be at least 1 (200 is the default on tiny).")
        if self.sample_steps is not None and self.sample_steps < 1:
            raise UserError(f"sample_steps {self.sample_steps} must be at least 1.")
        if self.class_images is not None and self.class_images < 1:
            raise UserError(f"class_images {self.class_images} must be at least 1.")
        unknown = [m for m in self.methods if m not in ("lora", "dreambooth")]
        if unknown or not self.methods:
            raise UserError(f"methods {list(self.methods)} must be 'lora' and/or 'dreambooth'.")
        if "lora" in self.methods and (not self.lora_ranks or min(self.lora_ranks) < 1):
            raise UserError(f"lora_ranks {list(self.lora_ranks)} must be one or more ranks of at least 1.")
        if "lora" in self.methods and any(not 1 <= r < self.lora_ranks[0] for r in self.resized_ranks):
            raise UserError(f"resized_ranks {list(self.resized_ranks)} must be below the first of lora_ranks "
                            f"({self.lora_ranks[0]}) and at least 1.")
        if not Path(self.photos).is_dir():
            raise UserError(f"The photo folder {self.photos} does not exist or is not a folder; "
                            "pass a folder of the subject's photos.")
        return self


@dataclass
class DemoRun:
    """One trained (or resized) model of the demo."""

    method: str
    rank: int | None
    path: Path
    steps: int
    reused: bool = False
    seconds: float = 0.0
    final_loss: float | None = None
    loss_curve: Path | None = None
    resized_from: int | None = None  # the rank of the LoRA this one was resized from
    note: str = ""

    @property
    def model(self) -> str:
        """The name images and scores carry: the method, or "lora-resized" for a resized LoRA."""
        return f"{self.method}-resized" if self.resized_from else self.method

    @property
    def label(self) -> str:
        """"lora r16", "lora-resized r4", "dreambooth": as in the grid and the tables."""
        return group_name(self.model, self.rank)


@dataclass
class DemoResult:
    out_dir: Path
    report: Path
    base: str
    base_is_noise: bool
    runs: list[DemoRun]
    images: list[Path]
    evaluation: EvalReport
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def total_seconds(self) -> float:
        return sum(self.seconds.values())


# ---------------------------------------------------------------- the job


def run_demo(out_dir: str | Path, base: str = "tiny", steps: int | None = None, progress: ProgressFn = no_progress,
             *, quick: bool = False, config: DemoConfig | None = None) -> DemoResult:
    """Run the three-scene test on `base` into `out_dir` and write `report.md` there.

    `config` overrides `base`, `steps` and `quick` with every setting; `progress` sees each step numbered."""
    cfg = config or (DemoConfig.quick(base=base, steps=steps or QUICK["steps"]) if quick
                     else DemoConfig(base=base, steps=steps))
    cfg.validate()
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"The output {out} is a file; pass a folder for the demo (--out).")
    trainings = [(m, r) for m in cfg.methods for r in (cfg.lora_ranks if m == "lora" else (None,))]
    stages = _Stages(progress, ["load base", "prepare photos"] + [f"train {group_name(m, r)}" for m, r in trainings]
                     + (["resize lora"] if "lora" in cfg.methods and cfg.resized_ranks else [])
                     + ["generate", "evaluate", "report"])
    with stages.step("load base") as report:
        model = load_model(cfg.base)
        _ = model.sha256  # hashed once, here: every copy below inherits it
        report(1, 1)
    noise = model.family == "tiny"
    plan = _Plan.make(cfg, model)
    with _single_thread(noise):
        with stages.step("prepare photos"):
            from .data import PrepareConfig, prepare_dataset

            dataset = prepare_dataset(cfg.photos, out / f"dataset_{plan.resolution}px",
                                      PrepareConfig(token=cfg.token, class_word=cfg.class_word,
                                                    resolution=plan.resolution), stages.sub())
        runs = []
        for method, rank in trainings:
            with stages.step(f"train {group_name(method, rank)}"):
                runs.append(_train(cfg, plan, method, rank, model, dataset.folder, out, stages.sub()))
        lora = next((r for r in runs if r.method == "lora"), None)
        if lora is not None and cfg.resized_ranks:
            with stages.step("resize lora") as report:
                runs += [_resize(lora, rank) for rank in cfg.resized_ranks]
                report(1, 1)
        runs.sort(key=lambda r: group_key(r.model, r.rank))  # the one order of every table and picture
        with stages.step("generate") as report:
            images = _generate_all(cfg, plan, model, runs, out / "images", report)
        with stages.step("evaluate"):
            from .eval.run import run_evaluate

            evaluation = run_evaluate(out / "images", cfg.photos, out / "evaluation", clip=cfg.clip, dino=cfg.dino,
                                      token=cfg.token, face_detector=cfg.face_detector, progress=stages.sub())
    with stages.step("report") as report:
        result = DemoResult(out, out / "report.md", cfg.base, noise, runs, images, evaluation, stages.seconds)
        atomic_write_text(result.report, render_report(result, cfg, plan, dataset))
        report(1, 1)
    return result


@dataclass
class _Plan:
    """The demo's settings once the base is known."""

    resolution: int
    steps: dict[str, int]
    class_images: int
    sample_steps: int

    @classmethod
    def make(cls, cfg: DemoConfig, model: SDModel) -> "_Plan":
        from .train_config import METHOD_DEFAULTS

        defaults = TINY_DEFAULTS if model.family == "tiny" else REAL_DEFAULTS
        steps = cfg.steps or defaults["steps"]
        return cls(resolution=model.resolution,
                   steps={m: steps or METHOD_DEFAULTS[m]["steps"] for m in ("lora", "dreambooth")},
                   class_images=cfg.class_images or defaults["class_images"],
                   sample_steps=cfg.sample_steps or defaults["sample_steps"])


class _Stages:
    """Numbers the demo's steps ("[3/8] train lora"), times them, and prefixes inner progress with them."""

    def __init__(self, progress: ProgressFn, names: list[str]):
        self.progress, self.names = progress, names
        self.seconds: dict[str, float] = {}
        self.label = ""

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[Callable[[int, int], None]]:
        self.label = f"[{self.names.index(name) + 1}/{len(self.names)}] {name}"
        started = time.perf_counter()
        yield lambda done, total, info=None: self.progress(Progress(self.label, done, total, info or {}))
        self.seconds[name] = time.perf_counter() - started

    def sub(self) -> ProgressFn:
        """The progress of the work inside the current step, under its label."""
        label = self.label
        return lambda e: self.progress(Progress(f"{label}: {e.stage}", e.step, e.total, e.info))


def _single_thread(on: bool):
    # tiny's layers are so small that a second thread costs more in synchronisation than it saves;
    # a real model keeps torch's own setting
    from .resources import one_thread

    return one_thread() if on else contextlib.nullcontext()


def _editable_copy(model: SDModel) -> SDModel:
    """A copy whose UNet and text encoder may be trained or merged into; VAE and tokenizer are shared."""
    return dataclasses.replace(model, unet=copy.deepcopy(model.unet), text_encoder=copy.deepcopy(model.text_encoder))


def _slug(base: str) -> str:
    name = "tiny" if base == "tiny" else Path(base).stem or Path(base).name
    return re.sub(r"[^A-Za-z0-9.-]+", "-", name).strip("-")[:40] or "base"


def _train(cfg: DemoConfig, plan: _Plan, method: str, rank: int | None, model: SDModel, dataset: Path, out: Path,
           progress: ProgressFn) -> DemoRun:
    from .train import train
    from .train_config import TrainConfig

    steps = plan.steps[method]
    # The name carries what differs between demo runs into one folder, so none refuses another's file.
    name = f"{method}{f'_r{rank}' if rank else ''}_{_slug(cfg.base)}_{steps}steps"
    extra = {"rank": rank} if rank else {"lr": DREAMBOOTH_LR, "lr_scheduler": DREAMBOOTH_SCHEDULER}
    tcfg = TrainConfig(method=method, base=cfg.base, instance_dir=str(dataset),
                       output=str(out / "models" / f"{name}.safetensors"), token=cfg.token,
                       class_word=cfg.class_word, steps=steps, num_class_images=plan.class_images,
                       prior_preservation=True, class_dir=str(out / "class_images"), seed=cfg.seed, **extra)
    started = time.perf_counter()
    result = train(tcfg, progress=progress, model=_editable_copy(model))  # a Cancelled from progress stops it here
    run_dir = tcfg.run_path
    return DemoRun(method, rank, result.output, steps, reused=result.reused, seconds=time.perf_counter() - started,
                   final_loss=result.final_loss if result.final_loss is not None else _last_loss(run_dir),
                   loss_curve=result.loss_curve)


def _last_loss(run_dir: Path) -> float | None:
    from .loss_log import read_loss_log

    rows = read_loss_log(run_dir)
    return rows[-1].get("loss") if rows else None


def _resize(lora: DemoRun, rank: int) -> DemoRun:
    from .lora import read_lora, resize, write_kohya

    started = time.perf_counter()
    small, layers = resize(read_lora(lora.path), rank=rank)
    kept = sum(layer.kept for layer in layers) / len(layers)
    path = lora.path.with_name(f"{lora.path.stem}_resized_r{rank}.safetensors")  # the trained r4 has the plain name
    write_kohya(small, path, metadata={"dreambooth.resized_from": lora.path.name,
                                       "dreambooth.resize_target": f"rank {rank}"})
    return DemoRun("lora", rank, path, lora.steps, seconds=time.perf_counter() - started, resized_from=lora.rank,
                   note=f"the r{lora.rank} LoRA resized by SVD (no training); keeps {kept:.0%} of its update's "
                        "norm, mean over layers")


# ---------------------------------------------------------------- pictures


def image_name(method: str, rank: int | None, scene: str, seed: int) -> str:
    """`<method>_r<rank>_<scene>_<n>.png`, the names `evaluate` reads method, rank and scene from."""
    return f"{method}{f'_r{rank}' if rank else ''}_{scene}_{seed}.png"


def _generate_all(cfg: DemoConfig, plan: _Plan, model: SDModel, runs: list[DemoRun], folder: Path,
                  report: Callable) -> list[Path]:
    from .generate import GenerateRequest, run_generate

    _remove_previous(folder)
    groups = ([("base", None, None)] if cfg.with_base else []) + [(r.model, r.rank, r) for r in runs]
    prompts = scene_prompts(cfg.token, cfg.class_word)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    written, described = [], {}
    for n, (method, rank, run) in enumerate(groups):
        report(n, len(groups), {"note": group_name(method, rank)})
        if method == "dreambooth":
            target = load_model(run.path)  # the written checkpoint, as a user would load it
        else:
            target = _editable_copy(model)  # a LoRA is merged into the weights: never into the shared model
        request = GenerateRequest(base=cfg.base, lora=str(run.path) if run and run.method == "lora" else None,
                                  token=cfg.token, class_word=cfg.class_word, out=folder / f".{method}_{rank}",
                                  seed=cfg.seed, steps=plan.sample_steps, resolution=plan.resolution,
                                  overwrite=True)  # the demo's own scratch folder: a killed demo may have left it
        # one bar over the models: the sampler reports only once per batch of pictures
        paths = run_generate(request, model=target.to(device))
        del target
        for path in paths:  # run_generate names them <scene>_<seed>.png
            scene = path.stem.rsplit("_", 1)[0]
            final = folder / image_name(method, rank, scene, cfg.seed)
            path.replace(final)
            written.append(final)
            described[final.name] = {"prompt": prompts[scene], "negative": SEED_NEGATIVE, "scene": scene,
                                     "method": method, "rank": rank, "seed": cfg.seed,
                                     "model": run.path.name if run else cfg.base}
        shutil.rmtree(request.out, ignore_errors=True)
    atomic_write_text(folder / "prompts.json", json.dumps(described, indent=1) + "\n")
    report(len(groups), len(groups))
    return written


def _remove_previous(folder: Path) -> None:
    """A previous run's pictures go, so the scores never mix two runs."""
    try:
        listed = json.loads((folder / "prompts.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    for name in listed if isinstance(listed, dict) else []:
        if Path(name).name == name:
            (folder / name).unlink(missing_ok=True)


# ---------------------------------------------------------------- the report


SCENE_LOOK = {
    "forest": "a face close-up: is it the subject?",
    "desert": "a middle view, running: does the subject survive a wider framing?",
    "mountains": "a close-up with a busy background: are both the person and the background kept?",
}


def render_report(result: DemoResult, cfg: DemoConfig, plan: _Plan, dataset: DatasetReport) -> str:
    """The Markdown report; every link is relative to the report's folder."""
    out, evaluation = result.out_dir, result.evaluation
    rel = lambda p: Path(p).resolve().relative_to(out.resolve()).as_posix()  # noqa: E731
    lines = [f"# Three-scene test: {' vs '.join(_method_title(m) for m in cfg.methods)} on `{_slug(cfg.base)}`", ""]
    if result.base_is_noise:
        lines += [f"> **{NOISE_NOTE}**", ""]
    total = result.total_seconds
    lines += [f"Base: `{cfg.base}` · {plan.resolution} px · subject: `{cfg.token} {cfg.class_word}` · "
              f"{len(result.images)} pictures · {total:.0f} s in all "
              f"({', '.join(f'{name} {sec:.0f} s' for name, sec in result.seconds.items())})", ""]
    lines += ["## Subject photos", "",
              f"{dataset.kept} photos from `{Path(cfg.photos).resolve()}`, cropped to {plan.resolution} px "
              f"(faces found in {dataset.faces_found} of {dataset.kept}), "
              f"caption \"{dataset.config.instance_prompt}\".",
              "", f"![contact sheet]({rel(dataset.contact_sheet)})", ""]
    lines += ["## Training", "",
              f"Prior preservation with {plan.class_images} class images (`{rel(out / 'class_images')}/`).", "",
              "| model | how | steps | final loss | time | file |", "|---|---|---|---|---|---|"]
    for run in result.runs:
        how = (f"the r{run.resized_from} LoRA resized (no training)" if run.resized_from
               else f"{_method_title(run.method)}, trained" + (f" at rank {run.rank}" if run.rank else ""))
        time_cell = "reused" if run.reused else f"{run.seconds:.1f} s"
        loss = "-" if run.final_loss is None else f"{run.final_loss:.4f}"
        steps = "-" if run.resized_from else run.steps
        lines.append(f"| {run.label} | {how} | {steps} | {loss} | {time_cell} | "
                     f"[`{run.path.name}`]({rel(run.path)}) |")
    lines.append("")
    lines += [f"- {r.label}: {r.note}" for r in result.runs if r.note]
    if any(r.method == "dreambooth" for r in result.runs):
        lines.append(f"- DreamBooth uses the seed's learning rate {DREAMBOOTH_LR:g} with a {DREAMBOOTH_SCHEDULER} "
                     "schedule; LoRA the trainer's defaults.")
    lines.append("")
    for run in result.runs:
        if run.loss_curve is not None:
            lines += [f"![loss of {run.label}]({rel(run.loss_curve)})", ""]
    lines += ["## All pictures", "", "One row per model, one column per scene; each tile is annotated with its scores "
              "(face line: green = the subject, red = no face or someone else).", "",
              f"![grid]({rel(out / 'evaluation' / 'grid.png')})", ""]
    lines += ["## Scores", ""] + _verdicts(result) + ["", "```", evaluation.table().rstrip(), "```", ""]
    if (out / "evaluation" / "chart.png").exists():
        lines += [f"![chart]({rel(out / 'evaluation' / 'chart.png')})", ""]
    lines += _scene_sections(result, cfg, rel)
    lines += ["## Files", "",
              f"- scores: `{rel(out / 'evaluation' / 'report.json')}`, `{rel(out / 'evaluation' / 'table.txt')}`",
              f"- prompts per picture: `{rel(out / 'images' / 'prompts.json')}`",
              f"- score again (e.g. with `--clip` / `--dino` models): `python -m training evaluate --images "
              f"{(out / 'images').resolve()} --references {Path(cfg.photos).resolve()} "
              f"--out {(out / 'evaluation').resolve()}`", ""]
    return "\n".join(lines)


def _method_title(method: str) -> str:
    return {"lora": "LoRA", "dreambooth": "DreamBooth"}.get(method, method)


def _verdicts(result: DemoResult) -> list[str]:
    """One sentence per model, from the per-model aggregates."""
    evaluation = result.evaluation
    if "identity" in evaluation.unavailable:
        return [f"Identity was not measured: {evaluation.unavailable['identity']}."]
    rows = evaluation.aggregates(by_scene=False)
    if all(not row["presence"] for row in rows):
        sentence = "No face was found in any picture."
        return [sentence + (" " + NO_FACE_ON_NOISE if result.base_is_noise else "")]
    baseline = evaluation.references.get("identity_distance")
    out = []
    for row in rows:
        n = row["n"]
        faces, match = round((row["presence"] or 0) * n), round((row["identity_match"] or 0) * n)
        text = (f"- **{group_name(row['method'], row['rank'])}**: a face in {faces} of {n} pictures, "
                f"the subject in {match}")
        if row["identity_distance"] is not None:
            text += f" (identity distance {row['identity_distance']:.2f}"
            text += f"; the photos lie {baseline:.2f} from each other)" if baseline is not None else ")"
        out.append(text + ".")
    return out


def _scene_sections(result: DemoResult, cfg: DemoConfig, rel: Callable) -> list[str]:
    """One section per scene (in the seed's order), one column per model (in the one order: group_key)."""
    prompts = scene_prompts(cfg.token, cfg.class_word)
    scenes = list(prompts) + sorted({s.scene for s in result.evaluation.images} - set(prompts))
    lines = []
    for scene in scenes:
        rows = sorted((s for s in result.evaluation.images if s.scene == scene),
                      key=lambda s: (group_key(s.method, s.rank), s.label))
        if not rows:
            continue
        first = rows[0]
        lines += [f"## Scene: {scene}", "", f"What to look for: {SCENE_LOOK.get(scene, '')}", "",
                  f"- prompt: `{first.prompt or prompts.get(scene, '')}`", f"- negative prompt: `{SEED_NEGATIVE}`", "",
                  "| " + " | ".join(group_name(r.method, r.rank) for r in rows) + " |",
                  "|" + "---|" * len(rows),
                  "| " + " | ".join(f"![{Path(r.path).name}]({rel(r.path)})" for r in rows) + " |",
                  "| " + " | ".join(_face_cell(r) for r in rows) + " |", ""]
    return lines


def _face_cell(scores) -> str:
    if scores.face_found is None:
        return "face: not measured"
    if not scores.face_found:
        return "no face"
    return f"{'subject' if scores.identity_match else 'someone else'} (d={scores.identity_distance:.2f})"
