"""training/cli/: the parser (built without the engine), --help, flag names, messages and progress lines."""
from __future__ import annotations

import dataclasses
import io
import re
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout

import pytest

from fixture_paths import ROOT
from training.cli import build_parser, main
from training.cli.progress import TqdmProgress, plan_text, stage_label
from training.progress import Progress

COMMANDS = [["info"], ["prepare"], ["class-images"], ["train"], ["generate"], ["evaluate"], ["demo"], ["lora"],
            ["lora", "info"], ["lora", "resize"], ["lora", "extract"], ["lora", "convert"]]


def test_building_the_parser_imports_no_torch_or_diffusers():
    probe = ("import sys; from training.cli import build_parser; build_parser(); "
             "print(' '.join(m for m in ('torch', 'diffusers', 'transformers', 'peft', 'accelerate') if m in sys.modules))")
    loaded = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True)
    assert loaded.stdout.strip() == "", f"--help would wait for: {loaded.stdout.strip()}"


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as done:
        main([*command, "--help"])
    assert done.value.code == 0
    assert capsys.readouterr().out.startswith("usage: python -m training " + " ".join(command))


# ---------------------------------------------------------------- --help: every option explained, defaults shown


def help_entries(text: str) -> dict[str, tuple[str, str]]:
    """argparse's --help parsed: option -> (its section, its help text); an option without help has ''."""
    entries, section, current = {}, "", None
    for line in text.splitlines():
        if re.match(r"^\S.*:$", line):
            section, current = line[:-1], None
            continue
        option = re.match(r"^  (-\w, )?(--[\w-]+)(.*)$", line)
        if option:  # "  --flag METAVAR, --alias METAVAR   help..." (the help may start on the next line)
            current = option[2]
            parts = re.split(r" {2,}", option[3], maxsplit=1)
            entries[current] = (section, parts[1].strip() if len(parts) > 1 else "")
        elif current and line.startswith(" " * 10) and line.strip():
            entries[current] = (entries[current][0], (entries[current][1] + " " + line.strip()).strip())
        else:
            current = None
    return entries


def command_help(*command: str) -> str:
    out = io.StringIO()
    with redirect_stdout(out), pytest.raises(SystemExit):
        main([*command, "--help"])
    return out.getvalue()


@pytest.mark.parametrize("command", ["train", "generate"])
def test_every_option_has_a_help_line_with_its_default(command):
    entries = help_entries(command_help(command))
    assert len(entries) >= (40 if command == "train" else 15), entries
    missing = [name for name, (_, text) in entries.items() if not text]
    assert not missing, f"`{command} --help`: no help line for {missing}"
    required = {name for name, (section, _) in entries.items() if section == "required"}
    assert {"--base", "--out"} <= required and (command != "train" or "--instance-dir" in required)
    no_default = [name for name, (section, text) in entries.items()
                  if section != "required" and name not in ("--help", "--scenes")
                  and not re.search(r"\(default: |unset: |default: the ", text)]
    assert not no_default, f"`{command} --help` does not say the default of {no_default}"


def test_train_help_quotes_the_method_defaults_and_every_config_field():
    from training.train_config import TrainConfig, method_defaults_text

    entries = help_entries(command_help("train"))
    assert "(LoRA 800, DreamBooth 400)" in entries["--steps"][1] and "unset" in entries["--steps"][1]
    assert method_defaults_text("lr") in entries["--lr"][1]
    assert "(default: 16)" in entries["--rank"][1] and "(default: off)" in entries["--prior-preservation"][1]
    assert "(default: auto)" in entries["--mixed-precision"][1]
    flags = {("--" + f.name.replace("_", "-")) for f in dataclasses.fields(TrainConfig)}
    flags = flags - {"--output", "--validation-prompts"} | {"--out", "--validation-prompt"}
    assert flags <= set(entries), flags - set(entries)


def test_generate_defaults_are_generate_requests():
    from training.cli.train import GENERATE_DEFAULTS, SAMPLERS
    from training.generate import GenerateRequest
    from training.sampling import SAMPLERS as ENGINE_SAMPLERS

    request = GenerateRequest()
    assert GENERATE_DEFAULTS == {k: getattr(request, k) for k in GENERATE_DEFAULTS}
    assert SAMPLERS == ENGINE_SAMPLERS
    entries = help_entries(command_help("generate"))
    assert "(default: 25)" in entries["--steps"][1] and "(default: 0)" in entries["--seed"][1]
    assert "(default: 7.5)" in entries["--cfg"][1]


# ---------------------------------------------------------------- --base required, one output flag


@pytest.mark.parametrize("argv", [["train", "--instance-dir", "photos", "--out", "x.safetensors"],
                                  ["generate", "--out", "images"], ["class-images", "--out", "classes"]],
                         ids=lambda a: a[0])
def test_base_is_required(argv, capsys):
    with pytest.raises(SystemExit) as done:
        main(argv)
    assert done.value.code == 2  # a usage error, before anything is loaded
    assert "the following arguments are required: --base" in capsys.readouterr().err


OUTPUTS = {  # argv before the output flag, and where argparse keeps it
    "train": (["train", "--base", "tiny", "--instance-dir", "p"], "output"),
    "generate": (["generate", "--base", "tiny"], "out"),
    "prepare": (["prepare", "photos"], "out"),
    "class-images": (["class-images", "--base", "tiny"], "out"),
    "evaluate": (["evaluate", "--images", "i", "--references", "r"], "out"),
    "demo": (["demo"], "out"),
    "lora resize": (["lora", "resize", "a.safetensors", "--rank", "2"], "out"),
    "lora extract": (["lora", "extract", "--base", "a", "--tuned", "b", "--rank", "2"], "out"),
    "lora convert": (["lora", "convert", "a.safetensors"], "out"),
}


@pytest.mark.parametrize("command", OUTPUTS)
@pytest.mark.parametrize("spelling", ["--out", "--output"])
def test_one_output_flag_everywhere_with_output_as_alias(command, spelling):
    argv, dest = OUTPUTS[command]
    assert getattr(build_parser().parse_args([*argv, spelling, "o.safetensors"]), dest) == "o.safetensors"


# ---------------------------------------------------------------- messages name the flags


def test_a_bad_train_config_names_each_flag_and_exits_1(tmp_path, capsys):
    code = main(["train", "--base", "tiny", "--instance-dir", str(tmp_path / "missing"), "--out",
                 str(tmp_path / "o.safetensors"), "--rank", "0", "--steps", "0", "--class-dir", str(tmp_path)])
    assert code == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error: --instance-dir: ") and "is not a folder" in err
    assert "--steps: 0 must be at least 1" in err and "--rank: 0 must be at least 1" in err
    assert "--class-dir: class images are used only with --prior-preservation on; pass --prior-preservation" in err
    assert not re.search(r"\b(instance_dir|class_dir|prior_preservation)\b", err), err


def test_outside_the_cli_messages_name_the_fields(tmp_path):
    """The library (and so the nodes) keeps naming inputs by their config fields."""
    from training.errors import UserError
    from training.train_config import TrainConfig

    with pytest.raises(UserError, match=r"^instance_dir: .* is not a folder"):
        TrainConfig(instance_dir=str(tmp_path / "missing"), output="x.safetensors").validate()


# ---------------------------------------------------------------- progress in a log file


def render(events: list[Progress], plain: bool = True) -> str:
    err = io.StringIO()
    with redirect_stderr(err):
        bar = TqdmProgress(plain=plain)
        for event in events:
            bar(event)
        bar.close()
    return err.getvalue()


def test_plain_progress_is_lines_at_every_tenth_without_carriage_returns():
    text = render([Progress("train", i, 200, {"loss": 0.5, "lr": 1e-4}) for i in range(1, 201)])
    lines = text.splitlines()
    assert "\r" not in text
    assert [int(re.match(r"train: (\d+)/200", line)[1]) for line in lines] == [1, *range(20, 201, 20)]
    assert lines[0] == "train: 1/200 (0%), loss 0.5, lr 0.0001", lines[0]  # no rate from a single step


def test_stage_labels_are_not_doubled():
    assert stage_label("[2/8] prepare photos: prepare") == "[2/8] prepare photos"
    assert stage_label("[3/8] train lora: train") == "[3/8] train lora"
    assert stage_label("[3/8] train lora: class images") == "[3/8] train lora: class images"
    assert stage_label("[7/8] evaluate: evaluate faces") == "[7/8] evaluate: faces"
    text = render([Progress("[2/8] prepare photos: prepare", 6, 6)])
    assert text.startswith("[2/8] prepare photos: 6/6 (100%)"), text


def test_messages_of_the_demo_are_not_bars():
    text = render([Progress("[3/8] train lora: warning", 0, 0, {"note": "low memory"}),
                   Progress("[3/8] train lora: resume", 5, 20, {"checkpoint": "c.safetensors"})])
    assert text.splitlines() == ["warning: low memory", "resuming from step 5 (checkpoint c.safetensors)"]


def test_the_plan_header_says_what_the_run_will_do():
    plan = {"base": "tiny", "family": "tiny", "dtype": "float32", "method": "lora", "rank": 4, "alpha": 4.0,
            "targets": "attn", "resolution": 64, "steps": 12, "batch_size": 1, "grad_accum": 1, "lr": 1e-4,
            "lr_scheduler": "constant", "lr_warmup_steps": 0, "optimizer": "adamw", "mixed_precision": "no",
            "prior_preservation": True, "num_class_images": 100, "class_images_to_generate": 40,
            "output": "o.safetensors", "run_dir": "o.safetensors.run"}
    header = dict(line.split(": ", 1) for line in plan_text(plan).splitlines())
    assert {k.strip() for k in header} == {"base", "method", "resolution", "steps", "lr", "prior preservation",
                                           "output", "run folder"}
    assert header["base"].strip() == "tiny (tiny, float32)"
    assert header["prior preservation"].strip() == "on: 100 class images, 40 to generate now"
    assert "constant schedule" in header["lr"] and "batch 1" in header["steps"]


def test_a_terminal_bar_shows_no_rate_before_it_means_something():
    text = render([Progress("train", 400, 800, {"loss": 0.5})], plain=False)  # a resumed run's first event
    assert "step/s" not in text.replace("?step/s", ""), text
