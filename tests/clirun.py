"""Test helpers: the CLI run in-process, and a PNG's pixels."""

from __future__ import annotations

import numpy as np
from PIL import Image

from zturbo.cli import main


def run(capsys, *argv):
    """(exit code, stdout, stderr) of `zturbo ARGV`; arguments may be paths or numbers."""
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def pixels(path):
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))
