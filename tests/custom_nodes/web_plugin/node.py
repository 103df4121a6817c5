class TestEcho:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"text": ("STRING", {"default": "hi", "multiline": True}),
                             "mode": (["upper", "lower"],)},
                "optional": {"image": ("IMAGE",)}}

    RETURN_TYPES = ("STRING",)
    FUNCTION = "echo"
    OUTPUT_NODE = True
    CATEGORY = "testing"

    def echo(self, text, mode, image=None):
        value = text.upper() if mode == "upper" else text.lower()
        return {"ui": {"text": [value]}, "result": (value,)}
