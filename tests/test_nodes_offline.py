"""The node pack's pure helpers, without ComfyUI: imports, names, labels, prompts, grid layout."""
import subprocess
import sys

import pytest
import torch
from PIL import Image

from fixture_paths import ROOT, load_pack

PACK = load_pack()
from pack_offline.nodes import fidelity, grid, host, lora, prompts  # noqa: E402
from training.errors import UserError  # noqa: E402
from training.train_config import TrainConfig, resolve_precision  # noqa: E402


def test_the_pack_imports_without_comfyui_and_without_torch():
    code = (f"import sys; sys.path.insert(0, {str(ROOT / 'tests')!r})\n"
            "from fixture_paths import load_pack\n"
            "m = load_pack()\n"
            "heavy = [n for n in ('comfy', 'folder_paths', 'server', 'torch', 'diffusers') if n in sys.modules]\n"
            "print(len(m.NODE_CLASS_MAPPINGS), heavy)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["9", "[]"]


def test_ids_are_prefixed_and_display_names_plain():
    assert set(PACK.NODE_CLASS_MAPPINGS) == set(PACK.NODE_DISPLAY_NAME_MAPPINGS)
    for node_id, name in PACK.NODE_DISPLAY_NAME_MAPPINGS.items():
        assert node_id.startswith("DreamBooth") and " " in name and not name.startswith("DreamBooth")
        cls = PACK.NODE_CLASS_MAPPINGS[node_id]
        assert cls.CATEGORY == "DreamBooth" and cls.DESCRIPTION and hasattr(cls, cls.FUNCTION)


@pytest.mark.parametrize("name, stem", [("subject_lora", "subject_lora"), ("subject v2.safetensors", "subject v2"),
                                        ("a.b-c_d", "a.b-c_d")])
def test_output_names_that_are_fine(name, stem):
    assert host.check_output_name(name) == stem


@pytest.mark.parametrize("name", ["", "  ", "../x", "..", "a/b", "a\\b", "/abs", "C:\\x", "a:b", 'a"b', "a<b", "a|b",
                                  "a?", "a*", "x.", ".hidden", "nul", "COM1.txt", "tab\there"])
def test_output_names_that_are_refused_with_one_line(name):
    with pytest.raises(host.NodeError) as info:
        host.check_output_name(name)
    assert "\n" not in str(info.value) and "output_name" in str(info.value)


def test_labels_from_text_or_from_a_linked_list():
    assert host.split_labels("a, b ,c") == ["a", "b", "c"]
    assert host.split_labels("lora r4\ndreambooth, v2\n") == ["lora r4", "dreambooth, v2"]
    assert host.split_labels(["forest", "desert", "mountains"]) == ["forest", "desert", "mountains"]
    assert host.split_labels([""]) == [] and host.split_labels(None) == []


def test_scene_prompts_fill_token_and_class_and_refuse_other_braces():
    texts, names = prompts.scene_prompt_lists("zwx", "dog", "park: {token} {class} in a park\n# skipped\nsea: a {class}")
    assert names == ["park", "sea"] and texts == ["zwx dog in a park", "a dog"]
    with pytest.raises(host.NodeError, match=r"scene 'park' has \{park\}"):
        prompts.scene_prompt_lists("zwx", "dog", "park: {token} {class} in a {park}")


def test_scene_prompts_default_is_the_seeds_three_scenes():
    from training.prompts import SEED_NEGATIVE

    spec = prompts.SubjectScenePrompts.INPUT_TYPES()["required"]
    out = prompts.SubjectScenePrompts().prompts("sks", "man", spec["scenes"][1]["default"], SEED_NEGATIVE)
    assert out[2] == ["forest", "desert", "mountains"] and out[1] == SEED_NEGATIVE
    assert out[0][0].startswith("portrait of sks man face, in the forest")
    assert prompts.SubjectScenePrompts.OUTPUT_IS_LIST == (True, False, True)


def test_a_bad_scene_line_is_one_line():
    with pytest.raises(host.NodeError, match="line 2"):
        prompts.scene_prompt_lists("sks", "man", "forest: a\nno colon here")


def test_tensor_and_pil_round_trip():
    batch = torch.rand(2, 8, 6, 3)
    images = host.tensor_to_pils([batch, batch[:1]])
    assert [im.size for im in images] == [(6, 8)] * 3
    back = host.pils_to_tensor(images[:2])
    assert back.shape == (2, 8, 6, 3) and torch.allclose(back, batch, atol=1 / 255)


def _solid(color, size=(20, 10)):
    return Image.new("RGB", size, color)


def test_grid_rows_are_the_connected_inputs_and_wrap_at_the_columns():
    red, green, blue = _solid("red"), _solid("green"), _solid("blue")
    rows = grid.image_rows([[red, green, blue], [blue, red, green]])
    assert [len(r) for r in rows] == [3, 3]
    rows = grid.image_rows([[red, green, blue, red, green, blue]], columns=3)
    assert [len(r) for r in rows] == [3, 3]
    assert grid.image_rows([[], [red]]) == [[red]]


def test_grid_drawing_puts_tiles_after_the_label_margins():
    red, blue = _solid((255, 0, 0)), _solid((0, 0, 255))
    plain = grid.draw_grid([[red, blue], [blue, red]])
    assert plain.size == (40, 20)
    assert plain.getpixel((5, 5)) == (255, 0, 0) and plain.getpixel((25, 5)) == (0, 0, 255)
    assert plain.getpixel((5, 15)) == (0, 0, 255)
    labelled = grid.draw_grid([[red, blue]], ["lora r4"], ["forest", "desert"])
    left, top = labelled.width - 40, labelled.height - 10
    assert left > 0 and top > 0
    assert labelled.getpixel((left + 5, top + 5)) == (255, 0, 0)
    assert labelled.getpixel((left + 25, top + 5)) == (0, 0, 255)


def test_grid_resizes_tiles_to_the_first_ones_size():
    out = grid.draw_grid([[_solid("red", (16, 16)), _solid("blue", (32, 32))]])
    assert out.size == (32, 16)


def test_grid_node_takes_lists_and_batches():
    node = grid.SubjectGrid()
    first = [torch.zeros(1, 8, 8, 3), torch.ones(1, 8, 8, 3), torch.zeros(1, 8, 8, 3)]
    second = [torch.ones(3, 8, 8, 3)]  # one batch of three
    (out,) = node.grid(first, [""], ["forest", "desert", "mountains"], images_2=second)
    assert out.shape[0] == 1 and out.shape[3] == 3 and out.shape[1] >= 16 and out.shape[2] >= 24


def test_row_labels_give_method_and_rank():
    assert fidelity.method_and_rank("lora r16") == ("lora", 16)
    assert fidelity.method_and_rank("LoRA rank 4") == ("LoRA", 4)
    assert fidelity.method_and_rank("extracted_r64") == ("extracted", 64)
    assert fidelity.method_and_rank("dreambooth") == ("dreambooth", None)
    assert fidelity.method_and_rank("sd15") == ("sd15", None)


def test_fidelity_tiles_take_scene_and_prompt_from_their_column():
    a, b = _solid("red"), _solid("blue")
    tiles = fidelity.eval_images([[a, b], [b]], ["lora r4"], ["forest", "desert"], ["p1", "p2"])
    assert [(t.method, t.rank, t.scene, t.prompt) for t in tiles] == [
        ("lora", 4, "forest", "p1"), ("lora", 4, "desert", "p2"), ("row 2", None, "forest", "p1")]


def test_lora_modules_that_comfyui_would_not_apply_are_named():
    state = {"lora_unet_a.lora_down.weight": torch.zeros(2, 4), "lora_unet_a.lora_up.weight": torch.zeros(3, 2),
             "lora_unet_a.alpha": torch.tensor(2.0),
             "lora_unet_b.lora_down.weight": torch.zeros(2, 4), "lora_unet_b.lora_up.weight": torch.zeros(3, 2),
             "lora_unet_c.lora_down.weight": torch.zeros(2, 5), "lora_unet_c.lora_up.weight": torch.zeros(3, 2)}
    key_map = {"lora_unet_a": "a.weight", "lora_unet_c": "c.weight"}
    weights = {"a.weight": torch.zeros(3, 4), "c.weight": torch.zeros(3, 4)}
    bad = lora.unloadable_keys(state, key_map, weights)
    assert bad[0] == "lora_unet_b (no such layer)" and bad[1].startswith("lora_unet_c (shape (3, 5)")
    assert len(bad) == 2


def test_trigger_and_rank_descriptions():
    assert lora.trigger_of({"dreambooth.token": "sks", "dreambooth.class_word": "man"}) == "sks man"
    assert lora.trigger_of({"modelspec.trigger_phrase": "ohwx"}) == "ohwx"
    assert lora.describe_ranks([4, 4]) == "4" and lora.describe_ranks([2, 8]).startswith("2-8")


@pytest.mark.parametrize("text, marked", [
    ("a photo of sks man", "a photo of  embedding:subject_lora.sks  man"),
    ("Sks, in a forest", " embedding:subject_lora.sks , in a forest"),
    ("(sks:1.2)", "( embedding:subject_lora.sks :1.2)"),
    ("skss man, embedding:sks, sks_2", "skss man, embedding:sks, sks_2"),  # whole words only; the host's syntax stays
])
def test_trigger_words_become_the_hosts_embedding_words(text, marked):
    assert lora.mark_triggers(text, {"sks": "subject_lora.sks"}) == marked


def test_only_the_bundled_embedding_line_of_the_core_loader_is_rewritten():
    import logging

    note = lora.BundledEmbeddingNote()
    def record(key):  # comfy/lora.py formats the message itself: no args
        return logging.LogRecord("root", logging.WARNING, "lora.py", 1, f"lora key not loaded: {key}", None, None)

    bundled, other = record("bundle_emb.sks.string_to_param.*"), record("lora_unet_x.lora_down.weight")
    assert note.filter(bundled) and note.filter(other)
    assert bundled.getMessage().startswith("This LoRA bundles a learned embedding for 'sks'; Load Subject LoRA")
    assert other.getMessage() == "lora key not loaded: lora_unet_x.lora_down.weight"


def test_auto_precision_is_full_precision_on_the_cpu():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert resolve_precision("auto") == "no" and resolve_precision("bf16") == "bf16"
    assert TrainConfig().mixed_precision == "auto"  # the node, the CLI and the library share this default
    with pytest.raises(UserError, match="mixed_precision: fp16 needs a GPU"):
        TrainConfig(instance_dir=str(ROOT), output="x.safetensors", mixed_precision="fp16").validate()
