"""Offline loading and saving of SD1.5-family models: round trips and refusals."""
import pytest
import torch
from safetensors.torch import load_file, save_file

import cli_runner
from training.errors import UserError
from training.models import (build_tiny, inspect_checkpoint, load_model, save_single_file,
                             to_ldm_state_dict)

ROOT = __import__("pathlib").Path(__file__).resolve().parent.parent


def diffusers_folder(model, folder):
    """The model as a diffusers folder, written the way a user gets one: the pipeline's save_pretrained."""
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline(vae=model.vae, text_encoder=model.text_encoder, tokenizer=model.tokenizer,
                                   unet=model.unet, scheduler=DDPMScheduler.from_config(model.scheduler_config),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def assert_same_weights(a, b):
    for name in ("unet", "vae", "text_encoder"):
        sa, sb = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        assert sa.keys() == sb.keys(), name
        unequal = [k for k in sa if not torch.equal(sa[k], sb[k])]
        assert not unequal, f"{name}: {unequal[:3]}"


def test_tiny_is_deterministic_and_real_tokenizer():
    a, b, c = build_tiny(0), build_tiny(0), build_tiny(1)
    assert a.sha256 == b.sha256 != c.sha256
    assert len(a.tokenizer) == 49408 and a.tokenizer.model_max_length == 77
    assert a.family == "tiny" and a.resolution == 64
    # same block types as SD1.5
    assert list(a.unet.config.down_block_types) == ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]


def test_tiny_built_again_is_an_independent_copy_of_the_same_weights():
    """From the third build of a seed on, build_tiny copies the modules it kept at the second: equal to a fresh
    build, and nothing done to one copy (its weights, its tokenizer's new tokens) reaches the next."""
    from training.models import build_random

    fresh = build_random("tiny", 5)
    built = [build_tiny(5) for _ in range(3)]
    with torch.no_grad():
        built[2].unet.conv_in.weight.add_(1.0)
    built[2].tokenizer.add_tokens(["<new-token>"])
    after = build_tiny(5)
    for model in built[:2] + [after]:
        assert_same_weights(model, fresh)
    assert len(after.tokenizer) == len(fresh.tokenizer) == 49408
    assert after.scheduler_config == fresh.scheduler_config and after.scheduler_config is not built[2].scheduler_config
    assert (after.family, after.source, after.source_kind) == (fresh.family, fresh.source, fresh.source_kind)
    assert after.unet is not built[2].unet and after.text_encoder is not built[2].text_encoder


def test_tiny_single_file_round_trip_is_bit_identical(tiny, tiny_file, tmp_path):
    original = load_file(str(tiny_file))
    loaded = load_model(tiny_file)
    assert loaded.family == "tiny" and loaded.source_kind == "single-file"
    assert_same_weights(tiny, loaded)  # diffusers' single-file loader yields the tensors we wrote
    again = save_single_file(loaded, tmp_path / "again.safetensors", dtype=torch.float32)
    written = load_file(str(again))
    assert written.keys() == original.keys()
    assert all(torch.equal(original[k], written[k]) for k in original)


def test_sd15_layout_round_trip_is_bit_identical(sd15_file, tmp_path):
    original = load_file(str(sd15_file))
    # the exact SD1.5 single-file layout: 686 UNet, 248 VAE and 197 text-encoder tensors
    prefixes = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer.")
    assert [sum(k.startswith(p) for k in original) for p in prefixes] == [686, 248, 197]
    assert original["model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"].shape == (320, 768)
    assert original["first_stage_model.encoder.mid.attn_1.q.weight"].shape == (512, 512, 1, 1)
    assert original["model.diffusion_model.output_blocks.2.1.conv.weight"].shape == (1280, 1280, 3, 3)
    model = load_model(sd15_file, dtype=torch.float16)
    assert model.family == "sd15"
    written = to_ldm_state_dict(model, torch.float16)
    assert written.keys() == original.keys()
    unequal = [k for k in original if not torch.equal(original[k], written[k])]
    assert not unequal, unequal[:3]


def test_diffusers_folder_loads_the_same_weights(tiny, tmp_path):
    folder = diffusers_folder(tiny, tmp_path / "tiny_diffusers")
    loaded = load_model(folder)
    assert loaded.source_kind == "diffusers" and loaded.family == "tiny"
    assert_same_weights(tiny, loaded)
    assert loaded.tokenizer("a photo of sks man").input_ids == tiny.tokenizer("a photo of sks man").input_ids


def test_fp16_save_halves_the_file(tiny, tmp_path):
    f16 = save_single_file(tiny, tmp_path / "a.safetensors", dtype=torch.float16)
    f32 = save_single_file(tiny, tmp_path / "b.safetensors", dtype=torch.float32)
    assert inspect_checkpoint(f16).dtype == "F16" and inspect_checkpoint(f32).dtype == "F32"
    assert f16.stat().st_size < 0.6 * f32.stat().st_size


def test_failed_save_leaves_nothing(tiny, tmp_path, monkeypatch):


    target = tmp_path / "model.safetensors"
    target.write_bytes(b"previous")

    def broken_save(tensors, path, metadata=None):
        open(path, "wb").write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("safetensors.torch.save_file", broken_save)
    with pytest.raises(UserError, match="disk is full"):
        save_single_file(tiny, target)
    assert target.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]


def _fake_checkpoint(path, tensors):
    save_file({k: torch.zeros(s) for k, s in tensors.items()}, str(path))
    return path


UNET = "model.diffusion_model."
REFUSALS = {
    "sdxl": ({UNET + "input_blocks.0.0.weight": (320, 4, 3, 3), UNET + "label_emb.0.0.weight": (1280, 2816),
              "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight": (4, 768)}, "SDXL"),
    "sd2": ({UNET + "input_blocks.0.0.weight": (320, 4, 3, 3),
             UNET + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 1024)}, "2.x"),
    "inpaint": ({UNET + "input_blocks.0.0.weight": (320, 9, 3, 3)}, "inpainting"),
    "lora": ({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": (4, 320),
              "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": (320, 4)}, "LoRA"),
    "vae_only": ({"encoder.conv_in.weight": (128, 3, 3, 3)}, "no Stable Diffusion UNet"),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_refusals_name_the_file_and_what_was_found(case, tmp_path):
    tensors, expected = REFUSALS[case]
    path = _fake_checkpoint(tmp_path / f"{case}.safetensors", tensors)
    with pytest.raises(UserError) as err:
        load_model(path)
    message = str(err.value)
    assert expected in message and path.name in message and "\n" not in message


def test_refuses_pickles_truncated_and_empty_files(tiny_file, tmp_path):
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"\x80\x02not really a pickle")
    with pytest.raises(UserError, match="never opened.*safetensors"):
        load_model(ckpt)
    empty = tmp_path / "empty.safetensors"
    empty.touch()
    with pytest.raises(UserError, match="empty"):
        load_model(empty)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(tiny_file.read_bytes()[: tiny_file.stat().st_size // 2])
    with pytest.raises(UserError, match="truncated"):
        load_model(truncated)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\xff" * 64)
    with pytest.raises(UserError, match="truncated or corrupt|truncated"):
        load_model(garbage)


def test_refuses_folder_with_only_pickle_weights(tiny, tmp_path):
    folder = diffusers_folder(tiny, tmp_path / "m")
    for f in (folder / "unet").glob("*.safetensors"):
        f.rename(f.with_suffix(".bin"))
    with pytest.raises(UserError, match="no .safetensors weights"):
        load_model(folder)


def test_cli_info(tiny_file):
    run = cli_runner.run(["info", tiny_file], cwd=ROOT)
    assert run.returncode == 0, run.stderr
    assert "tiny" in run.stdout and "sha256" in run.stdout and "unet" in run.stdout
    bad = cli_runner.run(["info", "missing.ckpt"], cwd=ROOT)
    assert bad.returncode == 1
    assert bad.stderr.strip().count("\n") == 0 and "missing.ckpt" in bad.stderr and "Traceback" not in bad.stderr
