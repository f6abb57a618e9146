"""Not built yet."""

from __future__ import annotations

import sys

from detector_service.settings import DetectorSettings


def run(settings: DetectorSettings, *, until_idle: bool = False) -> None:
    print("not implemented in this build", file=sys.stderr)
    raise SystemExit(2)
