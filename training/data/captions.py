"""Captions: the template, or a sidecar .txt beside the photo with the token made sure of."""
from __future__ import annotations

import re

from .dataset import PrepareConfig

CAPTION_PREPENDED = "its caption file lacked the token; prepended it"


def caption_for(cfg: PrepareConfig, sidecar_text: str | None) -> tuple[str, str, list[str]]:
    """(caption, where it came from, notes): the sidecar text with {token} and {class_word}
    filled in, or the token prepended when it lacks it; the template when there is none."""
    text = " ".join((sidecar_text or "").split())
    if not text:
        return cfg.instance_prompt, "template", []
    token, class_word = cfg.token.strip(), cfg.class_word.strip()
    if "{token}" in text or "{class_word}" in text:
        return text.replace("{token}", token).replace("{class_word}", class_word), "sidecar", []
    if re.search(rf"(?<!\w){re.escape(token)}(?!\w)", text):
        return text, "sidecar", []
    return f"{token}, {text}", "sidecar", [CAPTION_PREPENDED]


# ---------------------------------------------------------------- the caption check

# A phrase is "in nearly every caption" when it is in at least this share of them, and in at least
# REPEATED_MIN_CAPTIONS: with fewer photos any shared word would be flagged.
REPEATED_SHARE = 0.8
REPEATED_MIN_CAPTIONS = 3
REPEATED_MAX_WORDS = 3
# Words that say nothing about the subject; the template's own words, the token and the class word
# are ignored too.
STOP_WORDS = frozenset("""
a an the of in on at to for with and or but is are was were be been being it its this that these those
his her their my your our he she they him them i me we you as by from into onto over under near next
while very some any no not there here up down out off
photo photograph picture image shot close closeup view
""".split())
_BREAK = re.compile(r"[,.;:!?()\[\]{}\"|/]+")
_WORD = re.compile(r"[\w'-]+")


def repeated_phrases(captions: list[str], ignore: set[str]) -> list[tuple[str, int]]:
    """Phrases (1 to REPEATED_MAX_WORDS words, not crossing punctuation or ignored words) found in
    nearly every caption, as (phrase, captions holding it), most common first (then in reading order); only the longest of
    phrases that hold one another is kept ('red hair', not also 'red' and 'hair')."""
    if len(captions) < REPEATED_MIN_CAPTIONS:
        return []
    ignored = {w.lower() for w in ignore} | STOP_WORDS
    counts: dict[str, int] = {}
    for caption in captions:
        for phrase in _phrases(caption, ignored):
            counts[phrase] = counts.get(phrase, 0) + 1
    need = max(REPEATED_MIN_CAPTIONS, REPEATED_SHARE * len(captions))
    common = [p for p, n in counts.items() if n >= need]
    longest = [p for p in common if not any(p != q and f" {p} " in f" {q} " for q in common)]
    return sorted(((p, counts[p]) for p in longest), key=lambda pn: -pn[1])


def _phrases(caption: str, ignored: set[str]) -> dict[str, None]:
    """The caption's distinct phrases, in reading order."""
    found: dict[str, None] = {}
    for part in _BREAK.split(caption.lower()):
        run: list[str] = []
        for word in _WORD.findall(part) + [""]:  # "" ends the last run
            if word and word.strip("'-") and word not in ignored:
                run.append(word)
                continue
            for size in range(1, REPEATED_MAX_WORDS + 1):
                found.update(dict.fromkeys(" ".join(run[i:i + size]) for i in range(len(run) - size + 1)))
            run = []
    return found


def caption_warning(cfg: PrepareConfig, captions: list[str], sidecars: int) -> str | None:
    """One warning line naming the phrases found in nearly every caption, or None. Only per-image
    captions (`sidecars` of them came from .txt files) are checked: the template is the user's choice."""
    if not sidecars:
        return None
    allowed = f"{cfg.instance_prompt} {cfg.token} {cfg.class_word}"  # the template, filled in
    found = repeated_phrases(captions, set(_WORD.findall(allowed.lower())))
    if not found:
        return None
    names = ", ".join(f"'{p}'" for p, _ in found)
    counts = ", ".join(f"{n} of {len(captions)}" if len(found) == 1 else f"'{p}' {n} of {len(captions)}"
                       for p, n in found)
    are, they = ("are", "they") if len(found) > 1 else ("is", "it")
    return (f"{names} {are} in nearly every caption ({counts}): describe traits that change, not the subject's "
            f"fixed traits: remove {names} from the .txt captions, or {they} will not be learned by the token "
            f"'{cfg.token.strip()}'")
