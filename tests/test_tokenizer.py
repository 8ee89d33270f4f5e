"""The shipped CLIP tokenizer gives the same ids as CLIP's own SimpleTokenizer."""
import importlib.util

import pytest

from training.models import load_tokenizer
from training.prompts import SEED_NEGATIVE, scene_prompts

PROMPTS = [
    *scene_prompts("sks", "man").values(),
    SEED_NEGATIVE,
    "naked, nsfw, deformed, distorted, disfigured, poorly drawn, bad anatomy, extra limb, missing limb, floating limbs, mutated hands, mutation, ugly, blurry",
    "a photo of sks man",
    "a photo of a man",
    "a photo of sks dog",
    "A Photo Of SKS Man In UPPER case",
    "a photo of  sks   man   with   spaces",
    "an astronaut riding a horse on the moon, trending on artstation",
    "café, naïve façade, résumé",
    "emoji 😀 and symbols ™ © ®",
    "numbers 1234567890 and 3.14159",
    "portrait, (masterpiece:1.2), [detailed], {braces}",
    "日本語のテキスト",
    "hyphen-ated words and under_scores",
    "it's a dog's life, isn't it?",
    "url http://example.com/path?x=1",
    "sks",
    "",
    "a very long prompt " * 20,
    "tabs\tand\nnewlines",
]


@pytest.fixture(scope="module")
def reference():
    spec = importlib.util.find_spec("clip")
    if spec is None:
        pytest.skip("clip-anytorch is not installed (pip install --no-deps clip-anytorch ftfy regex)")
    from pathlib import Path

    # load only its tokenizer module: the package __init__ imports torchvision
    path = Path(spec.submodule_search_locations[0]) / "simple_tokenizer.py"
    loader = importlib.util.spec_from_file_location("clip_simple_tokenizer", path)
    module = importlib.util.module_from_spec(loader)
    loader.loader.exec_module(module)
    return module.SimpleTokenizer()


def test_vocabulary_is_full():
    tok = load_tokenizer()
    assert len(tok) == 49408
    assert tok.model_max_length == 77
    assert tok.bos_token_id == 49406 and tok.eos_token_id == 49407 and tok.pad_token_id == 49407


@pytest.mark.parametrize("prompt", PROMPTS)
def test_ids_equal_clip_simple_tokenizer(prompt, reference):
    tok = load_tokenizer()
    expected = [reference.encoder["<|startoftext|>"], *reference.encode(prompt), reference.encoder["<|endoftext|>"]]
    assert tok(prompt).input_ids == expected


def test_padding_to_77():
    ids = load_tokenizer()("a photo of sks man", padding="max_length", max_length=77, truncation=True).input_ids
    assert len(ids) == 77 and ids[-1] == 49407
