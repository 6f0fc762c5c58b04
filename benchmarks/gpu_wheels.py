"""Build the wheel folder `benchmarks/gpu_check.sh` installs from, on a machine with pip access to the registry.

    python benchmarks/gpu_wheels.py .whl                        # for the GPU image's Python 3.12, x86-64 Linux
    python benchmarks/gpu_wheels.py .whl --python-version 3.11  # another target Python
    python benchmarks/gpu_wheels.py .whl --dry_run              # print what would be downloaded

The GPU machine has torch, accelerate, numpy, pandas, pyarrow and pytest but no registry: what it lacks travels
as wheels. This script takes `CARRIED` (datasets and trl, which the machine lacks; transformers and peft, whose
versions there may be older than this project needs) and every requirement of theirs, recursively, except
`PREINSTALLED`, and downloads each at the version installed in *this* environment (a set known to work together)
with `pip download --no-deps --only-binary=:all:` for the target Python and platform. Requirement markers are
evaluated for the target Python; optional extras are not followed.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement

CARRIED = ("datasets", "trl", "transformers", "peft")
# On the GPU image already (device KINDS.md), and large: never carried. The torch family is the image's by design.
# typing-extensions is carried although the image has it: the carried pydantic and anyio need >= 4.16.
PREINSTALLED = {"torch", "triton", "accelerate", "numpy", "pandas", "pyarrow", "pytest", "setuptools", "pip",
                "psutil", "pyyaml", "packaging", "filelock", "fsspec", "jinja2", "networkx", "sympy", "mpmath",
                "markupsafe", "requests", "urllib3", "idna", "certifi", "charset-normalizer",
                "aiohttp", "aiosignal", "aiohappyeyeballs", "attrs", "frozenlist", "multidict", "propcache", "yarl",
                "python-dateutil", "six", "tzdata", "pytz", "regex", "tqdm", "safetensors"}
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def target_environment(python_version: str) -> dict[str, str]:
    environment = default_environment()
    environment.update(python_version=python_version, python_full_version=f"{python_version}.0",
                       sys_platform="linux", platform_system="Linux", platform_machine="x86_64")
    return environment


def closure(roots: tuple[str, ...], skip: set[str], python_version: str) -> dict[str, str]:
    """Name -> installed version of `roots` and everything they require here (for the target Python), minus `skip`."""
    environment = {**target_environment(python_version), "extra": ""}
    found: dict[str, str] = {}
    queue = list(roots)
    while queue:
        name = canonical(queue.pop())
        if name in found or name in skip:
            continue
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            raise SystemExit(f"{name} is required but not installed here (pip install -e '.[dev]')") from None
        for line in metadata.requires(name) or []:
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate(environment):
                queue.append(requirement.name)
    return found


def download_command(dest: Path, name: str, version: str, python_version: str) -> list[str]:
    platforms = [argument for platform in PLATFORMS for argument in ("--platform", platform)]
    return [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--implementation", "cp",
            "--python-version", python_version, *platforms, "-d", str(dest), f"{name}=={version}"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dest", type=Path, help="folder to put the wheels in (ignore it in git)")
    parser.add_argument("--python-version", default="3.12", help="the GPU machine's Python (its image: 3.12)")
    parser.add_argument("--dry_run", action="store_true", help="list the packages and versions, download nothing")
    args = parser.parse_args(argv)
    wanted = closure(CARRIED, {canonical(n) for n in PREINSTALLED}, args.python_version)
    for name, version in sorted(wanted.items()):
        print(f"{name}=={version}")
        if not args.dry_run:
            args.dest.mkdir(parents=True, exist_ok=True)
            subprocess.run(download_command(args.dest, name, version, args.python_version), check=True,
                           stdout=subprocess.DEVNULL)
    if not args.dry_run:
        size = sum(f.stat().st_size for f in args.dest.glob("*.whl")) / 2**20
        print(f"{len(wanted)} wheels in {args.dest}, {size:.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
