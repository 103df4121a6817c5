"""The embedded engine's CPU node set, run through /prompt and read back from DIR/output."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from support.server import png_bytes, wait_history


async def run(client: Any, graph: dict[str, Any]) -> dict[str, Any]:
    resp = await client.post("/prompt", json={"prompt": graph})
    body = await resp.json()
    assert resp.status == 200, body
    entry = await wait_history(client, body["prompt_id"])
    assert entry["status"]["status_str"] == "success", entry["status"]
    return entry


def saved(data_dir: Path, entry: dict[str, Any], node: str = "9") -> list[np.ndarray]:
    images = entry["outputs"][node]["images"]
    folder = {"output": "output", "temp": "temp"}
    return [np.asarray(Image.open(data_dir / folder[i["type"]] / i["subfolder"] / i["filename"]).convert("RGB"),
                       dtype=np.float32) / 255.0 for i in images]


def empty(width: int = 8, height: int = 6, color: int = 0xFF0000, batch: int = 1) -> dict[str, Any]:
    return {"class_type": "EmptyImage",
            "inputs": {"width": width, "height": height, "batch_size": batch, "color": color}}


def save(source: str, prefix: str = "t", slot: int = 0) -> dict[str, Any]:
    return {"class_type": "SaveImage", "inputs": {"images": [source, slot], "filename_prefix": prefix}}


async def test_empty_image_color_batch_and_save_names(instance, data_dir: Path) -> None:
    client = await instance()
    entry = await run(client, {"1": empty(5, 3, 0x336699, batch=2), "9": save("1", "sub/dir/pic")})
    images = entry["outputs"]["9"]["images"]
    assert images == [{"filename": "pic_00001_.png", "subfolder": "sub/dir", "type": "output"},
                      {"filename": "pic_00002_.png", "subfolder": "sub/dir", "type": "output"}]
    pixels = saved(data_dir, entry)
    assert pixels[0].shape == (3, 5, 3)
    assert np.allclose(pixels[0][0, 0], [0x33 / 255, 0x66 / 255, 0x99 / 255])
    # the counter continues after what is on disk, and the prompt is in the PNG text
    entry = await run(client, {"1": empty(5, 3, 0x336698), "9": save("1", "sub/dir/pic")})
    assert entry["outputs"]["9"]["images"][0]["filename"] == "pic_00003_.png"
    with Image.open(data_dir / "output" / "sub" / "dir" / "pic_00003_.png") as png:
        assert '"EmptyImage"' in png.text["prompt"]


async def test_save_counter_is_remembered_and_never_takes_another_writers_name(instance, data_dir: Path) -> None:
    """The next counter is kept per (folder, prefix): listed once, again only when a name turns out taken."""
    import sys

    folder = data_dir / "output" / "keep"
    listings: list[str] = []
    watching = True

    def audit(event: str, args: tuple[Any, ...]) -> None:
        if watching and event == "os.listdir" and Path(str(args[0] or ".")).resolve() == folder.resolve():
            listings.append(event)

    sys.addaudithook(audit)  # cannot be removed: it goes quiet when the test ends
    try:
        client = await instance()

        async def save_one(color: int) -> str:
            entry = await run(client, {"1": empty(color=color), "9": save("1", "keep/pic")})
            return entry["outputs"]["9"]["images"][0]["filename"]

        assert [await save_one(1), await save_one(2)] == ["pic_00001_.png", "pic_00002_.png"]
        (folder / "pic_00002_.png").unlink()  # a name once handed out is not reused for another image
        assert await save_one(3) == "pic_00003_.png"
        (folder / "pic_00004_.png").write_bytes(b"another instance's image")  # the next name, taken behind us
        (folder / "pic_00007_.png").write_bytes(b"another instance's later image")
        assert await save_one(4) == "pic_00008_.png"  # listed again: past everything on disk
        assert await save_one(5) == "pic_00009_.png"
        assert (folder / "pic_00004_.png").read_bytes() == b"another instance's image"
        assert (folder / "pic_00007_.png").read_bytes() == b"another instance's later image"
        assert len(listings) == 2  # the first save and the one that met a taken name; not one per save
    finally:
        watching = False


async def test_save_prefix_outside_output_fails_the_node(instance, data_dir: Path) -> None:
    client = await instance()
    resp = await client.post("/prompt", json={"prompt": {"1": empty(), "9": save("1", "../escape")}})
    prompt_id = (await resp.json())["prompt_id"]
    entry = await wait_history(client, prompt_id)
    assert entry["status"]["status_str"] == "error"
    error = dict(entry["status"]["messages"])["execution_error"]
    assert error["node_id"] == "9" and error["node_type"] == "SaveImage"
    assert "outside the output folder" in error["exception_message"]
    assert not (data_dir / "escape_00001_.png").exists()


async def test_load_image_invert_crop_flip_rotate(instance, data_dir: Path) -> None:
    image = Image.new("RGB", (4, 2), (255, 0, 0))
    image.putpixel((0, 0), (0, 0, 255))
    image.save(data_dir / "input" / "src.png")
    client = await instance()
    info = await (await client.get("/object_info/LoadImage")).json()
    assert "src.png" in info["LoadImage"]["input"]["required"]["image"][0]
    graph = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "src.png"}},
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "3": {"class_type": "ImageCrop", "inputs": {"image": ["1", 0], "width": 2, "height": 1, "x": 0, "y": 0}},
        "4": {"class_type": "ImageFlip", "inputs": {"image": ["1", 0], "flip_method": "y-axis: horizontally"}},
        "5": {"class_type": "ImageRotate", "inputs": {"image": ["1", 0], "rotation": "90 degrees"}},
        "9": save("2"), "10": save("3"), "11": save("4"), "12": save("5"),
    }
    entry = await run(client, graph)
    inverted, = saved(data_dir, entry, "9")
    assert np.allclose(inverted[0, 0], [1, 1, 0]) and np.allclose(inverted[1, 3], [0, 1, 1])
    cropped, = saved(data_dir, entry, "10")
    assert cropped.shape == (1, 2, 3) and np.allclose(cropped[0, 0], [0, 0, 1])
    flipped, = saved(data_dir, entry, "11")
    assert np.allclose(flipped[0, 3], [0, 0, 1])
    rotated, = saved(data_dir, entry, "12")
    assert rotated.shape == (4, 2, 3) and np.allclose(rotated[0, 1], [0, 0, 1])  # clockwise


async def test_load_image_mask_from_alpha_and_channel(instance, data_dir: Path) -> None:
    (data_dir / "input" / "a.png").write_bytes(png_bytes((4, 4), (10, 200, 30, 64)))
    client = await instance()
    graph = {
        "1": {"class_type": "LoadImageMask", "inputs": {"image": "a.png", "channel": "green"}},
        "2": {"class_type": "LoadImage", "inputs": {"image": "a.png"}},
        "3": {"class_type": "ImagePadForOutpaint",
              "inputs": {"image": ["2", 0], "left": 2, "top": 0, "right": 0, "bottom": 0, "feathering": 0}},
        "9": save("3"),
    }
    entry = await run(client, graph)
    padded, = saved(data_dir, entry)
    assert padded.shape == (4, 6, 3)
    assert np.allclose(padded[0, 0], 0.5, atol=0.01)
    assert np.allclose(padded[0, 2], [10 / 255, 200 / 255, 30 / 255], atol=0.01)


async def test_scale_blur_sharpen_blend_quantize_batch_repeat(instance, data_dir: Path) -> None:
    client = await instance()
    graph = {
        "1": empty(8, 4, 0x808080),
        "2": {"class_type": "ImageScale",
              "inputs": {"image": ["1", 0], "upscale_method": "bilinear", "width": 16, "height": 0,
                         "crop": "disabled"}},
        "3": {"class_type": "ImageScaleBy",
              "inputs": {"image": ["1", 0], "upscale_method": "lanczos", "scale_by": 0.5}},
        "4": {"class_type": "ImageBlur", "inputs": {"image": ["1", 0], "blur_radius": 2, "sigma": 1.0}},
        "5": {"class_type": "ImageSharpen",
              "inputs": {"image": ["1", 0], "sharpen_radius": 1, "sigma": 1.0, "alpha": 1.0}},
        "6": empty(8, 4, 0xFFFFFF),
        "7": {"class_type": "ImageBlend",
              "inputs": {"image1": ["1", 0], "image2": ["6", 0], "blend_factor": 1.0, "blend_mode": "multiply"}},
        "8": {"class_type": "ImageQuantize", "inputs": {"image": ["1", 0], "colors": 2, "dither": "bayer-4"}},
        "13": {"class_type": "ImageBatch", "inputs": {"image1": ["1", 0], "image2": ["2", 0]}},
        "14": {"class_type": "RepeatImageBatch", "inputs": {"image": ["13", 0], "amount": 3}},
        "9": save("2"), "10": save("3"), "11": save("4"), "12": save("5"), "15": save("7"), "16": save("8"),
        "17": save("14"),
    }
    entry = await run(client, graph)
    assert saved(data_dir, entry, "9")[0].shape == (8, 16, 3)  # height from the aspect ratio
    assert saved(data_dir, entry, "10")[0].shape == (2, 4, 3)
    for node in ("11", "12", "15"):  # a flat gray stays gray under blur, sharpen, multiply by white
        assert np.allclose(saved(data_dir, entry, node)[0], 0x80 / 255, atol=1 / 255)
    assert len(saved(data_dir, entry, "16")) == 1
    batch = saved(data_dir, entry, "17")
    assert len(batch) == 6 and all(b.shape == (4, 8, 3) for b in batch)


async def test_get_image_size_feeds_an_int_input(instance, data_dir: Path) -> None:
    client = await instance()
    graph = {
        "1": empty(12, 7),
        "2": {"class_type": "GetImageSize", "inputs": {"image": ["1", 0]}},
        "3": {"class_type": "ImageCrop",
              "inputs": {"image": ["1", 0], "width": ["2", 1], "height": ["2", 1], "x": 0, "y": 0}},
        "9": save("3"),
    }
    entry = await run(client, graph)
    assert saved(data_dir, entry)[0].shape == (7, 7, 3)


async def test_preview_image_goes_to_temp(instance, data_dir: Path) -> None:
    client = await instance()
    entry = await run(client, {"1": empty(), "9": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}}})
    image, = entry["outputs"]["9"]["images"]
    assert image["type"] == "temp" and image["filename"].startswith("ComfyUI_temp_")
    assert (data_dir / "temp" / image["filename"]).is_file()
    view = await client.get("/view", params=image)
    assert view.status == 200


@pytest.mark.parametrize("node", ["EmptyImage", "LoadImage", "LoadImageMask", "SaveImage", "PreviewImage",
                                  "ImageScale", "ImageScaleBy", "ImageInvert", "ImageBatch", "ImagePadForOutpaint",
                                  "ImageBlur", "ImageSharpen", "ImageBlend", "ImageQuantize", "ImageCrop",
                                  "ImageRotate", "ImageFlip", "RepeatImageBatch", "GetImageSize"])
async def test_object_info_describes_each_node_as_comfyui(instance, node: str) -> None:
    client = await instance()
    info = (await (await client.get(f"/api/object_info/{node}")).json())[node]
    assert set(info) >= {"input", "input_order", "output", "output_is_list", "output_name", "name",
                         "display_name", "description", "python_module", "category", "output_node"}
    assert info["name"] == node and info["python_module"] == "nodes"
    assert info["input_order"]["required"] == list(info["input"]["required"])
    assert info["output_node"] == (node in ("SaveImage", "PreviewImage"))
