"""Subject Scene Prompts: the three-scene test (or your own scenes) with the subject filled in."""
from __future__ import annotations

from .host import CATEGORY, NodeError, user_errors


def scene_prompt_lists(token: str, class_word: str, scenes: str) -> tuple[list[str], list[str]]:
    """(prompts, scene names) from `name: prompt` lines; {token} and {class} are filled in, other
    braces are refused (they would reach the text encoder as written)."""
    from ..training.prompts import fill_prompt, parse_scenes, stray_braces

    with user_errors():
        parsed = parse_scenes(scenes)
    for name, prompt in parsed.items():
        stray = stray_braces(prompt)
        if stray:
            raise NodeError(f"The scene '{name}' has {stray}; only {{token}} and {{class}} are filled in, so "
                            "remove the other braces.")
    return [fill_prompt(p, token.strip(), class_word.strip()) for p in parsed.values()], list(parsed)


class SubjectScenePrompts:
    DESCRIPTION = ("The prompts of the three-scene test (forest close-up, desert middle view, mountains) with the "
                   "subject's token and class filled in. Outputs a list: the nodes after it run once per scene.")
    CATEGORY = CATEGORY
    FUNCTION = "prompts"
    RETURN_TYPES = ("STRING", "STRING", "STRING")
    RETURN_NAMES = ("prompts", "negative", "scene_names")
    OUTPUT_IS_LIST = (True, False, True)
    OUTPUT_TOOLTIPS = ("One prompt per scene (a list).", "The negative prompt.",
                       "The scene names (a list), e.g. for Subject Grid's column labels.")

    @classmethod
    def INPUT_TYPES(cls):
        from ..training.prompts import SEED_NEGATIVE, scenes_text

        return {
            "required": {
                "token": ("STRING", {"default": "sks", "tooltip": "The subject's trigger token, as trained."}),
                "class_word": ("STRING", {"default": "man", "tooltip": "The subject's class, as trained."}),
                "scenes": ("STRING", {"default": scenes_text(), "multiline": True, "tooltip":
                           "One scene per line, 'name: prompt'. {token} and {class} are filled in (other braces are "
                           "refused); lines starting with # are skipped."}),
                "negative": ("STRING", {"default": SEED_NEGATIVE, "multiline": True, "tooltip":
                             "The negative prompt for every scene."}),
            },
        }

    def prompts(self, token, class_word, scenes, negative):
        prompts, names = scene_prompt_lists(token, class_word, scenes)
        return (prompts, negative, names)
