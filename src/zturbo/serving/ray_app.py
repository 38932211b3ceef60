"""The Ray Serve application for `serve run` / `serve deploy` and KubeRay (docs/ray.md):

    serve run zturbo.serving.ray_app:app \
        argv="--model Tongyi-MAI/Z-Image-Turbo --store postgresql://... --data-dir /mnt/zturbo"

`argv` is `zturbo serve`'s own arguments (the --ray-* flags included); `zturbo serve --ray ADDRESS`
deploys the same application from the command line.
"""

from __future__ import annotations

import shlex
from typing import Any


def app(args: dict[str, str]) -> Any:
    """Ray Serve's application builder: `args` from `serve run ... argv="..."` or a config file's `args`."""
    from ..cli import serve_options
    from .raydeploy import build_app, check_store, ray_options
    from .serve import serve_settings, store_location

    unknown = sorted(set(args) - {"argv"})
    if unknown:
        raise ValueError(f'unknown application argument(s) {", ".join(unknown)}: give argv="<zturbo serve arguments>"')
    namespace, config = serve_options(shlex.split(args.get("argv", "")))
    options = ray_options(namespace)
    check_store(store_location(namespace))
    serve_settings(namespace, config, devices=["ray"])  # a bad flag or model fails the deploy, not each replica
    return build_app(namespace, config, options)
