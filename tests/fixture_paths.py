"""Paths the tests share. (Not in conftest.py: tests/comfyui/ has a conftest module of its own,
so `from conftest import ...` would pick whichever one was imported first.)"""
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SUBJECT_PHOTOS = ROOT / "training" / "sample_data" / "subject"
OTHER_PEOPLE = ROOT / "tests" / "fixtures" / "other_people"
