"""Write training/configs/<family>/module_table.json: the LoRA-able modules of each SD1.5-family
layout, read by `training.lora.names.module_table` instead of building meta models at every start.

    python scripts/build_module_tables.py

tests/test_lora_names.py checks that the shipped tables equal freshly built ones.
"""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from training.lora.names import FAMILIES, MODULE_TABLE_FILE, module_rows  # noqa: E402
from training.models import FAMILY_CONFIGS  # noqa: E402
from training.safe_io import atomic_write_text  # noqa: E402

for family in FAMILIES:
    path = FAMILY_CONFIGS[family] / MODULE_TABLE_FILE
    atomic_write_text(path, json.dumps(module_rows(family), indent=0, separators=(",", ":")) + "\n")
    print(path)
