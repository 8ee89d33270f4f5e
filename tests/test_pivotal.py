"""Pivotal tuning on `tiny` (training/pivotal.py, training/embedding.py): the new tokens train for the first
part of the run and then stay fixed, every other row of the token table is the base's, the files carry the
embedding the way A1111 and diffusers read it, and `generate --lora` uses it."""
import torch
from safetensors.torch import load_file

from fixture_paths import SUBJECT_PHOTOS
import pytest

from training.embedding import EMBEDDING_KEY, META_TRIGGER, META_VECTORS, TokenEmbedding, bundle_key
from training.models import build_tiny
from training.safe_io import read_metadata
from training.train import embedding_output, train
from training.train_config import TrainConfig


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from training.data import PrepareConfig, prepare_dataset

    out = tmp_path_factory.mktemp("pivotal_dataset")
    prepare_dataset(SUBJECT_PHOTOS, out, PrepareConfig(resolution=64))
    return out


def token_table(model) -> TokenEmbedding:
    return model.text_encoder.get_input_embeddings()


def test_the_new_tokens_train_then_freeze_and_every_other_row_stays_the_base_s(dataset, tmp_path):
    model, base = build_tiny(), build_tiny()
    seen = []

    def watch(event):
        if event.stage == "train":
            seen.append(token_table(model).extra.detach().clone())

    cfg = TrainConfig(instance_dir=str(dataset), output=str(tmp_path / "p.safetensors"), steps=8, rank=4,
                      pivotal_tokens=2, pivotal_frac=0.5, save_every=0, seed=1)
    result = train(cfg, progress=watch, model=model)
    assert len(seen) == 8
    moved = [not torch.equal(a, b) for a, b in zip(seen, seen[1:])]
    assert moved[:3] == [True] * 3, "the embedding did not train during the first half"
    assert moved[3:] == [False] * 4, "the embedding changed after the freeze step"
    table = token_table(model)
    assert torch.equal(table.base.weight, base.text_encoder.get_input_embeddings().weight)
    frozen = {n: p for n, p in model.text_encoder.named_parameters() if not n.endswith(".extra")}
    base_params = dict(base.text_encoder.named_parameters())
    assert all(torch.equal(p, base_params[n.replace("token_embedding.base.", "token_embedding.")])
               for n, p in frozen.items())

    lora, emb_file = load_file(str(result.output)), embedding_output(cfg)
    bundled = lora[bundle_key("sks")]
    standalone = load_file(str(emb_file))
    assert list(standalone) == [EMBEDDING_KEY] and standalone[EMBEDDING_KEY].shape == bundled.shape == (2, 32)
    assert torch.equal(standalone[EMBEDDING_KEY], bundled)
    assert torch.equal(bundled, seen[-1].half())
    for meta in (read_metadata(result.output), read_metadata(emb_file)):
        assert meta[META_TRIGGER] == "sks" and meta[META_VECTORS] == "2"


def test_a1111_reads_the_bundled_embedding_as_its_loader_parses_the_keys(dataset, tmp_path):
    """extensions-builtin/Lora/networks.py, load_network: the key splits at its first dot; 'bundle_emb'
    then <name>.<vec_name>; vec_name 'string_to_param.<k>' gives {'string_to_param': {k: tensor}}, which
    textual_inversion.create_embedding_from_data needs with exactly one entry."""
    out = tmp_path / "a1111.safetensors"
    train(TrainConfig(instance_dir=str(dataset), output=str(out), steps=2, rank=4, pivotal_tokens=3, save_every=0))
    bundle_embeddings = {}
    for key_network, weight in load_file(str(out)).items():
        key_network_without_network_parts, _, network_part = key_network.partition(".")
        if key_network_without_network_parts == "bundle_emb":
            emb_name, vec_name = network_part.split(".", 1)
            emb_dict = bundle_embeddings.get(emb_name, {})
            if vec_name.split(".")[0] == "string_to_param":
                _, k2 = vec_name.split(".", 1)
                emb_dict["string_to_param"] = {k2: weight}
            else:
                emb_dict[vec_name] = weight
            bundle_embeddings[emb_name] = emb_dict
    assert list(bundle_embeddings) == ["sks"]
    params = bundle_embeddings["sks"]["string_to_param"]
    assert len(params) == 1 and next(iter(params.values())).shape == (3, 32)


def test_lora_info_shows_the_embedding_and_resize_and_convert_keep_it(dataset, tmp_path):
    from training.lora import read_lora, resize, write_kohya
    from training.lora.info import lora_info

    out = tmp_path / "info.safetensors"
    train(TrainConfig(instance_dir=str(dataset), output=str(out), steps=2, rank=4, pivotal_tokens=2, save_every=0))
    text = lora_info(out)
    assert "embedding: sks (2 vectors of 32" in text and "not mapped: none" in text
    lora = read_lora(out)
    small, _ = resize(lora, rank=2)
    write_kohya(small, tmp_path / "small.safetensors")
    write_kohya(lora, tmp_path / "converted.safetensors")
    original = load_file(str(out))[bundle_key("sks")]
    for name in ("small", "converted"):
        assert torch.equal(load_file(str(tmp_path / f"{name}.safetensors"))[bundle_key("sks")], original)


def _instance_loss(model, dataset, caption: str) -> float:
    """Denoising loss on the instance images at fixed timesteps and noise, conditioned on `caption`."""
    from PIL import Image

    from training.examples import encode
    from training.loss import noise_schedule

    images = [Image.open(p).convert("RGB") for p in sorted(dataset.glob("*.png")) if "contact" not in p.name]
    cached = encode(model, images, [caption] * len(images), 64, TrainConfig(), lambda e: None, "x")
    g = torch.Generator().manual_seed(0)
    latents = cached.latent_mean * model.vae.config.scaling_factor
    noise = torch.randn(latents.shape, generator=g)
    t = torch.tensor([100, 300, 500, 700, 900, 200][: len(images)])
    with torch.no_grad():
        pred = model.unet(noise_schedule(model).add_noise(latents, noise, t), t, cached.embeddings).sample
    return float(torch.nn.functional.mse_loss(pred, noise))


def test_pivotal_tuning_fits_the_photos_better_than_a_plain_lora_of_equal_steps(dataset, tmp_path):
    kw = dict(instance_dir=str(dataset), steps=40, rank=4, lr=3e-3, save_every=0, seed=1)
    plain, pivotal = build_tiny(), build_tiny()
    train(TrainConfig(output=str(tmp_path / "plain.safetensors"), **kw), model=plain)
    train(TrainConfig(output=str(tmp_path / "pivotal.safetensors"), pivotal_tokens=2, pivotal_lr=3e-2, **kw),
          model=pivotal)
    plain_loss = _instance_loss(plain, dataset, "a photo of sks man")
    pivotal_loss = _instance_loss(pivotal, dataset, "a photo of <sks_0> <sks_1> man")
    print(f"instance loss after 40 steps: plain LoRA {plain_loss:.4f}, pivotal {pivotal_loss:.4f}")
    assert pivotal_loss < plain_loss


def test_generate_with_the_lora_applies_its_embedding_as_diffusers_does(dataset, tmp_path, capsys):
    """Our `generate --lora FILE` equals diffusers' load_lora_weights of `lora convert --drop-embedding`'s file
    plus load_textual_inversion of the standalone embedding (same seed): the path a diffusers user takes."""
    import numpy as np
    from PIL import Image

    from training.cli import main
    from training.generate import GenerateRequest, run_generate
    from training.lora.info import lora_info
    from training.sampling import make_pipeline

    out = tmp_path / "gen.safetensors"
    cfg = TrainConfig(instance_dir=str(dataset), output=str(out), steps=4, rank=4, lr=3e-3, pivotal_tokens=2,
                      pivotal_lr=5e-2, save_every=0)
    train(cfg)
    converted = tmp_path / "gen_diffusers.safetensors"
    assert main(["lora", "convert", str(out), "--out", str(converted), "--drop-embedding"]) == 0
    said = capsys.readouterr().out
    assert f"dropped embedding sks: load {embedding_output(cfg).name} with load_textual_inversion" in said
    bundled, plain_keys = load_file(str(out)), load_file(str(converted))
    assert set(plain_keys) == {k for k in bundled if not k.startswith("bundle_emb.")} and plain_keys
    assert all(torch.equal(plain_keys[k], bundled[k]) for k in plain_keys)
    assert not {META_TRIGGER, META_VECTORS} & set(read_metadata(converted))
    assert read_metadata(converted)["dreambooth.token"] == "sks"
    assert "embedding:" not in lora_info(converted) and "embedding: sks" in lora_info(out)

    prompt, negative = "a photo of sks man in a forest", "blurry"
    req = dict(base="tiny", prompts=[prompt], negative=negative, seed=3, steps=4, guidance=5.0)
    ours = np.asarray(Image.open(run_generate(GenerateRequest(lora=str(out), out=tmp_path / "ours", **req))[0]))
    plain = np.asarray(Image.open(run_generate(GenerateRequest(out=tmp_path / "base", **req))[0]))

    pipe = make_pipeline(build_tiny())
    pipe.load_lora_weights(str(converted))
    pipe.load_textual_inversion(str(embedding_output(cfg)), token="sks")
    latents = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        theirs = pipe(prompt=[prompt], negative_prompt=[negative], height=64, width=64, num_inference_steps=4,
                      guidance_scale=5.0, latents=latents).images[0]
    theirs = np.asarray(theirs)
    difference = np.abs(ours.astype(int) - theirs.astype(int))
    print(f"ours vs diffusers: max {difference.max()}, mean {difference.mean():.3f} (of 255); "
          f"vs the base: mean {np.abs(ours.astype(int) - plain.astype(int)).mean():.3f}")
    assert difference.max() <= 3
    assert np.abs(ours.astype(int) - plain.astype(int)).mean() > 4 * max(difference.mean(), 0.1)


def test_diffusers_refuses_the_bundled_file_and_drop_embedding_of_a_plain_file_only_converts(dataset, tmp_path,
                                                                                             capsys):
    """When this fails because diffusers loads a bundle_emb file, README's `--drop-embedding` line can go."""
    from training.cli import main
    from training.sampling import make_pipeline

    out = tmp_path / "bundled.safetensors"
    train(TrainConfig(instance_dir=str(dataset), output=str(out), steps=2, rank=4, pivotal_tokens=2, save_every=0))
    with pytest.raises(ValueError, match="Invalid LoRA checkpoint"):
        make_pipeline(build_tiny()).load_lora_weights(str(out))
    once, twice = tmp_path / "once.safetensors", tmp_path / "twice.safetensors"
    assert main(["lora", "convert", str(out), "--out", str(once), "--drop-embedding"]) == 0
    capsys.readouterr()
    assert main(["lora", "convert", str(once), "--out", str(twice), "--drop-embedding"]) == 0
    assert "--drop-embedding: the file carries no embedding; nothing dropped" in capsys.readouterr().out
    assert load_file(str(twice)).keys() == load_file(str(once)).keys()


def test_convert_help_says_why_and_where_the_embedding_goes(capsys):
    from training.cli import main

    with pytest.raises(SystemExit):
        main(["lora", "convert", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--drop-embedding" in text and "load_lora_weights, which refuses bundle_emb keys" in text
    assert "load_textual_inversion(<stem>_embedding.safetensors)" in text
