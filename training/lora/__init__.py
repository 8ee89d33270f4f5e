"""LoRA files for SD1.5: read every common format, write kohya, change rank, extract, describe.

names (module tables, kohya names) -> layers (LoraLayer, LoraFile) -> read / write / resize /
extract / info. The public names are re-exported here: `from training.lora import read_lora`.
"""
from .extract import extract, extraction_targets
from .info import lora_info
from .layers import LoraFile, LoraLayer
from .names import FAMILIES, MODULE_TABLE_FILE, ModuleTable, kohya_name, module_rows, module_table
from .read import read_lora
from .resize import LayerResize, format_report, resize
from .write import kohya_metadata, kohya_state_dict, peft_state_to_lora, write_kohya

__all__ = ["FAMILIES", "MODULE_TABLE_FILE", "LayerResize", "LoraFile", "LoraLayer", "ModuleTable", "extract",
           "extraction_targets", "format_report", "kohya_metadata", "kohya_name", "kohya_state_dict", "lora_info",
           "module_rows", "module_table", "peft_state_to_lora", "read_lora", "resize", "write_kohya"]
