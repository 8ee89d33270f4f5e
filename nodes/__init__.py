"""The pack's ComfyUI nodes: thin adapters over `training/`. One module per concern."""
from .checkpoint import LoadSubjectCheckpoint
from .class_images import SubjectClassImages
from .dataset import PrepareSubjectDataset
from .fidelity import SubjectFidelity
from .grid import SubjectGrid
from .lora import ExtractSubjectLoRA, LoadSubjectLoRA
from .prompts import SubjectScenePrompts
from .train import TrainSubject

# id -> (class, display name). Ids carry our prefix: an id equal to a built-in one is ignored by ComfyUI.
_NODES = {
    "DreamBoothPrepareSubjectDataset": (PrepareSubjectDataset, "Prepare Subject Dataset"),
    "DreamBoothClassImages": (SubjectClassImages, "Class Images"),
    "DreamBoothTrainSubject": (TrainSubject, "Train Subject"),
    "DreamBoothLoadSubjectLoRA": (LoadSubjectLoRA, "Load Subject LoRA"),
    "DreamBoothLoadSubjectCheckpoint": (LoadSubjectCheckpoint, "Load Subject Checkpoint"),
    "DreamBoothExtractSubjectLoRA": (ExtractSubjectLoRA, "Extract Subject LoRA"),
    "DreamBoothScenePrompts": (SubjectScenePrompts, "Subject Scene Prompts"),
    "DreamBoothSubjectGrid": (SubjectGrid, "Subject Grid"),
    "DreamBoothSubjectFidelity": (SubjectFidelity, "Subject Fidelity"),
}
NODE_CLASS_MAPPINGS = {node_id: cls for node_id, (cls, _) in _NODES.items()}
NODE_DISPLAY_NAME_MAPPINGS = {node_id: name for node_id, (_, name) in _NODES.items()}
