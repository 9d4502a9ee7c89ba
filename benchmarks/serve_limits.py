"""Cost of refusing the issue-27 hostile uploads: wall time of one request to the service (an untrained linear
probe on a tiny CLIP with the default focal views, loaded in-process) for the 655-byte 32 x 16000 PNG, a 2 x
20,000,000 PNG header and a 6300 x 6300 PNG header; each is answered 413/422 from its header. Before the bounds
(3ec5e49) the first took 228 s of CPU (issue 27).

    python benchmarks/serve_limits.py
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    from fastapi.testclient import TestClient
    from tests.helpers import save_tiny_clip
    from tests.test_serve_limits import header_png, real_png

    from medbridge.methods import create_method, save_method
    from medbridge.serve.app import create_app

    root = Path(tempfile.mkdtemp())
    method = create_method("linear-probe", {"C": [0.1]}, backbones=[save_tiny_clip(root / "clip")],
                           labels=["a", "b", "c"], focal={})
    folder = save_method(method, root / "linear_probe")
    with TestClient(create_app(folder), base_url="http://127.0.0.1") as c:
        for name, data in (("32 x 16000 PNG (655 B)", real_png(32, 16000)),
                           ("2 x 20,000,000 PNG header", header_png(2, 20_000_000)),
                           ("6300 x 6300 PNG header", header_png(6300, 6300))):
            t0 = time.perf_counter()
            r = c.post("/v1/predict", content=data)
            dt = time.perf_counter() - t0
            print(f"{name}: {r.status_code} in {dt * 1000:.1f} ms: {r.json()['error']}")


if __name__ == "__main__":
    main()
