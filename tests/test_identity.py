"""Identity tracked during training (training/identity.py): validation renders scored, scores in loss.jsonl,
and keep="best-identity" writing exactly the weights of the step the face metric marks best.

The face metric is a deterministic test double here (the selection logic is what is tested): it returns a
preset distance per validation call, in order. The real dlib scorer is tested in tests/test_evaluate.py."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from training import identity
from training.errors import UserError
from training.eval.scorers import FaceScore
from training.identity import KEPT_FILE, StepScores, better
from training.train import train
from training.train_config import TrainConfig


@pytest.fixture(scope="module")
def dataset(tiny_dataset):
    return tiny_dataset  # the photos prepared at 64 px once per session (conftest.py)


def preset_faces(distances: list[float | None]):
    """A face scorer factory whose n-th call scores every render of that validation at distances[n]
    (None: no face found)."""
    calls = iter(distances)

    def factory(references):
        assert references, "the dataset's crops are the references"

        def score(images):
            d = next(calls)
            return [FaceScore(faces=0) if d is None else FaceScore(faces=1, distance=d, nearest=d) for _ in images]
        return score
    return factory


def config(dataset, out: Path, **kw) -> TrainConfig:
    # constant lr: a shorter run then takes exactly the same steps as the first steps of a longer one
    base = dict(instance_dir=str(dataset), output=str(out), steps=4, rank=4, seed=3, save_every=0,
                lr_scheduler="constant", validation_every=2, validation_prompts=["a photo of {token} {class}"],
                validation_steps=2)  # the preset scorer ignores the pictures: 2 sampling steps render enough
    return TrainConfig(**(base | kw))


@pytest.fixture(scope="module")
def plain(dataset, tmp_path_factory):
    """keep last without validation (renders never change the weights): the LoRA of step 2 and of step 4."""
    out = tmp_path_factory.mktemp("plain")
    return {steps: load_file(str(train(config(dataset, out / f"steps{steps}.safetensors", steps=steps,
                                              validation_every=0)).output)) for steps in (2, 4)}


def assert_same_weights(path: Path, expected: dict) -> None:
    written = load_file(str(path))
    assert written.keys() == expected.keys()
    assert all(torch.equal(written[k], expected[k]) for k in expected)


def rows(result) -> list[dict]:
    return [json.loads(line) for line in (result.run_dir / "loss.jsonl").read_text().splitlines()]


def test_better_prefers_lower_distance_and_the_later_step_on_ties():
    a, b = StepScores(2, 0.5, 1.0), StepScores(4, 0.5, 1.0)
    assert better(b, a) and better(StepScores(6, 0.4, 1.0), b) and not better(StepScores(8, 0.6, 1.0), b)
    assert not better(StepScores(10, None, 0.0), None)  # no face: never a candidate
    assert better(a, None)


def test_best_identity_writes_the_best_steps_weights_exactly(dataset, plain, tmp_path, monkeypatch):
    assert any(not torch.equal(plain[2][k], plain[4][k]) for k in plain[2])  # steps 2 and 4 differ: this can fail
    monkeypatch.setattr(identity, "face_scorer", preset_faces([0.3, 0.5]))  # step 2 is best
    best = train(config(dataset, tmp_path / "best.safetensors", keep="best-identity"))
    assert best.steps_done == 4 and best.kept is not None and best.kept.step == 2
    assert best.kept.identity == pytest.approx(0.3) and best.kept.presence == 1.0
    assert [(r["step"], r.get("identity")) for r in rows(best) if "identity" in r] == [(2, 0.3), (4, 0.5)]
    assert_same_weights(best.output, plain[2])
    kept = load_file(str(best.run_dir / KEPT_FILE))
    assert kept and all(v.dtype == torch.float32 for v in kept.values())


def test_ties_go_to_the_later_step_and_keep_last_is_unchanged(dataset, plain, tmp_path, monkeypatch):
    monkeypatch.setattr(identity, "face_scorer", preset_faces([0.4, 0.4]))
    tied = train(config(dataset, tmp_path / "tied.safetensors", keep="best-identity"))
    assert tied.kept.step == 4
    assert_same_weights(tied.output, plain[4])
    monkeypatch.setattr(identity, "face_scorer", preset_faces([0.3, 0.5]))
    last = train(config(dataset, tmp_path / "last.safetensors"))  # keep last, validated: scores, same weights
    assert last.kept is None and [r.get("identity") for r in rows(last) if "identity" in r] == [0.3, 0.5]
    assert_same_weights(last.output, plain[4])
    assert not (last.run_dir / KEPT_FILE).exists()  # keep last stores no extra weights


def test_no_face_in_any_render_writes_the_last_step_and_says_so(dataset, plain, tmp_path, monkeypatch):
    monkeypatch.setattr(identity, "face_scorer", preset_faces([None, None]))
    notes = []
    result = train(config(dataset, tmp_path / "none.safetensors", keep="best-identity"),
                   progress=lambda e: notes.append(e.info.get("note")) if e.stage == "warning" else None)
    assert result.kept is None and result.steps_done == 4
    assert any(n and "no validation render showed a face" in n for n in notes)
    assert [r["presence"] for r in rows(result) if "presence" in r] == [0.0, 0.0]
    assert_same_weights(result.output, plain[4])


def test_best_identity_needs_validation():
    with pytest.raises(UserError, match="validation_every"):
        TrainConfig(instance_dir="x", output="y.safetensors", keep="best-identity").validate()
    with pytest.raises(UserError, match="keep"):
        TrainConfig(instance_dir="x", output="y.safetensors", keep="best").validate()


def test_validation_steps_are_hashed_only_where_they_choose_the_kept_step():
    validated = dict(keep="best-identity", validation_every=2)
    assert TrainConfig(validation_steps=2).result_hash() == TrainConfig().result_hash()  # keep last: renders only
    assert TrainConfig(**validated, validation_steps=20).result_hash() == TrainConfig(**validated).result_hash()
    assert TrainConfig(**validated, validation_steps=2).result_hash() != TrainConfig(**validated).result_hash()
    with pytest.raises(UserError, match="validation_steps"):
        TrainConfig(instance_dir="x", output="y.safetensors", validation_steps=0).validate()


def test_default_validation_set_has_the_off_identity_probe():
    from training.prompts import PROBE_PROMPT

    assert PROBE_PROMPT in TrainConfig().validation_prompts and "purple hair" in PROBE_PROMPT


def _colour_rows(path: Path, colour: tuple[int, int, int]) -> set[int]:
    from PIL import Image

    with Image.open(path) as image:
        rgb = image.convert("RGB")
        # the plot area only (x 56..584, y 24..290): the legend text above it is left out
        return {y for y in range(24, 291) for x in range(57, 584) if rgb.getpixel((x, y)) == colour}


def test_loss_plot_draws_identity_and_a_constant_lr_inside_the_frame(tmp_path):
    from training.loss_log import IDENTITY_COLOUR, plot_loss

    rows = [{"step": s, "loss": 0.1 + 0.01 * (s % 3), "lr": 1e-4} for s in range(1, 31)]
    plain = plot_loss(rows, tmp_path / "plain.png")
    orange = (0xcc, 0x77, 0x33)
    lr_rows = _colour_rows(plain, orange)
    assert lr_rows and min(lr_rows) > 24 + 5  # not on the frame's top edge (y = 24)
    magenta = tuple(int(IDENTITY_COLOUR[i] * 2, 16) for i in (1, 2, 3))
    assert not _colour_rows(plain, magenta)
    for r in rows:
        if r["step"] % 10 == 0:
            r["identity"] = 0.9 - r["step"] / 100
    scored = plot_loss(rows, tmp_path / "scored.png")
    assert len(_colour_rows(scored, magenta)) > 10  # a line through three points
