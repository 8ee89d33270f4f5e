"""Test-only ComfyUI node (conftest.new_server copies it into each test server's custom_nodes/): writes a
CONDITIONING's tensors to output/<name>.safetensors so a test can compare encodings exactly."""


class TestSaveConditioning:
    CATEGORY = "testing"
    FUNCTION = "save"
    OUTPUT_NODE = True
    RETURN_TYPES = ()

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"conditioning": ("CONDITIONING",), "name": ("STRING", {"default": "cond"})}}

    def save(self, conditioning, name):
        import os

        import folder_paths
        from safetensors.torch import save_file

        cond, extra = conditioning[0]
        tensors = {"cond": cond.float().contiguous()}
        if extra.get("pooled_output") is not None:
            tensors["pooled"] = extra["pooled_output"].float().contiguous()
        save_file(tensors, os.path.join(folder_paths.get_output_directory(), f"{name}.safetensors"))
        return {"ui": {"text": [name]}}


NODE_CLASS_MAPPINGS = {"TestSaveConditioning": TestSaveConditioning}
