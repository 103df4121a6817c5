"""Stand-in for ComfyUI's ``main.py`` in the ``--comfyui-dir`` tests.

It accepts ComfyUI's flags (names as in comfy/cli_args.py), records what it
was started with (``COMFYUI_SHIM_RECORD``: one JSON line per start), can
wait before serving (``COMFYUI_SHIM_DELAY_S``, for slow model loads), can
fail at start as ComfyUI does on a bad flag or a missing GPU (``--shim-fail
MESSAGE``: the message on stderr, exit code 3), and then becomes a
comfyserve instance on the data dir it was given, which speaks the same
protocol.
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

parser = argparse.ArgumentParser()
parser.add_argument("--listen", nargs="?", const="0.0.0.0,::", default="127.0.0.1")
parser.add_argument("--port", type=int, default=8188)
parser.add_argument("--base-directory")
parser.add_argument("--input-directory")
parser.add_argument("--output-directory")
parser.add_argument("--temp-directory")
parser.add_argument("--user-directory")
parser.add_argument("--extra-model-paths-config", nargs="+", action="append")
parser.add_argument("--max-upload-size", type=float, default=100)
parser.add_argument("--disable-auto-launch", action="store_true")
parser.add_argument("--shim-fail")
args, unknown = parser.parse_known_args()

base = Path(args.base_directory or Path(__file__).parent)
record = os.environ.get("COMFYUI_SHIM_RECORD")
if record:
    configs = [path for group in args.extra_model_paths_config or [] for path in group]
    with open(record, "a") as out:
        out.write(json.dumps({
            "argv": sys.argv[1:], "pid": os.getpid(), "cwd": os.getcwd(), "unknown": unknown,
            "custom_nodes_existed": (base / "custom_nodes").is_dir(),
            "model_paths": [Path(c).read_text() for c in configs],
        }) + "\n")
if args.shim_fail:
    print("shim: loading", flush=True)
    print(f"shim: {args.shim_fail}", file=sys.stderr, flush=True)
    sys.exit(3)
delay_s = float(os.environ.get("COMFYUI_SHIM_DELAY_S", "0"))
if delay_s:
    print(f"shim: loading for {delay_s} s", flush=True)
    time.sleep(delay_s)
print(f"shim: serving {base} on {args.listen}:{args.port}", flush=True)
env = {k: v for k, v in os.environ.items() if not k.startswith("COMFYSERVE_")}
os.execve(sys.executable, [sys.executable, "-m", "standard", "--listen", args.listen, "--port", str(args.port),
                          "--data-dir", str(base), "--max-upload-size", f"{args.max_upload_size:g}"], env)
