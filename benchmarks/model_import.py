"""Time and peak host memory to import a released checkpoint, and to export it to diffusers.

    python benchmarks/model_import.py [--preset lsun256|imagenet64]

A state dict in openai/consistency_models' layout with random weights (``cd_bedroom256_*``
for the default, the 526M-parameter LSUN U-Net, a 2.1 GB file) is written to a temporary
directory. Each step then runs in a fresh process, which prints its seconds and its peak
resident memory above what it held after its imports:

- baseline: ``torch.load`` of the file and ``torch.save`` of it again, the least any
  conversion does;
- import: ``cmray import openai`` (the shapes checked, a cmray model file written);
- export: ``cmray export diffusers`` of that model file (a ``UNet2DModel`` built, its weights
  renamed and saved as safetensors).

Printed: the file size, each step's seconds and peak, and each step's ratio to the baseline.
The import checks the shapes against the presets, so only a full-size net can be imported.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import child_json, peak_mib, start

from cmray.models.openai import reference_key
from cmray.nets.unet import UNet, unet_config


def write_release(path: Path, preset: str) -> int:
    """A random state dict in the reference's layout; returns its parameter count."""
    torch.manual_seed(0)
    net = UNet(unet_config(preset))
    state = {}
    for key, value in net.state_dict().items():
        ref = reference_key(key)
        conv = ref.endswith(("qkv.weight", "proj_out.weight"))  # 1x1 convs in the reference
        state[ref] = value[:, :, None, None] if conv else value
    torch.save(state, path)
    return sum(v.numel() for v in state.values())


def child(step: str, src: str, dst: str) -> None:
    """Run one step; print its seconds and peak above the post-import peak as JSON."""
    from cmray.cli import main

    before = peak_mib()
    tick = time.perf_counter()
    if step == "baseline":
        torch.save(torch.load(src, weights_only=True, map_location="cpu"), dst)
    elif step == "import":
        assert main(["import", "openai", src, "--out", dst]) == 0
    else:
        assert main(["export", "diffusers", "--model", src, "--out", dst]) == 0
    seconds = time.perf_counter() - tick
    print(json.dumps({"step": step, "seconds": seconds, "peak_mib": peak_mib() - before}))


def measure(step: str, src: Path, dst: Path) -> dict[str, float]:
    return child_json(__file__, step, str(src), str(dst))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="lsun256", choices=("lsun256", "imagenet64"))
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(*args.child)
        return 0
    start("cpu", None)
    name = "cd_bedroom256_l2.pt" if args.preset == "lsun256" else "cd_imagenet64_l2.pt"
    with tempfile.TemporaryDirectory(prefix="cmray-model-import-") as tmp:
        release = Path(tmp) / name
        params = write_release(release, args.preset)
        size = release.stat().st_size / 2**20
        base = measure("baseline", release, Path(tmp) / "copy.pt")
        imp = measure("import", release, Path(tmp) / "model.pt")
        exp = measure("export", Path(tmp) / "model.pt", Path(tmp) / "pipeline")
    print(f"{args.preset}: {params / 1e6:.1f}M parameters")
    print(f"released file: {size:.0f} MiB")
    for name, r in (("load + save (baseline)", base), ("import openai", imp), ("export", exp)):
        print(f"{name}: {r['seconds']:.1f} s, peak +{r['peak_mib']:.0f} MiB")
    for name, r in (("import", imp), ("export", exp)):
        time_ratio = r["seconds"] / base["seconds"]
        memory_ratio = r["peak_mib"] / base["peak_mib"]
        print(f"ratio {name} / baseline: time {time_ratio:.2f}, peak memory {memory_ratio:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
