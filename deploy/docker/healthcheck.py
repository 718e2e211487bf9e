#!/usr/bin/env python3
"""The image's HEALTHCHECK (installed as /usr/local/bin/fednode-healthcheck).

    fednode-healthcheck [PATH]     GET http://127.0.0.1:PORT/PATH (default /livez)

PORT is the one in FEDNODE_HEALTH (HOST:PORT, what the entrypoint passes as
`fednode run --health`; the image sets 0.0.0.0:8080). Exit 0 on HTTP 200, 1 otherwise, with
one line saying why, which `docker inspect` shows. Standard library only: it runs every few
seconds, so it must not import torch or fednode.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request


def main(argv: list[str]) -> int:
    path = argv[1] if len(argv) > 1 else "/livez"
    health = os.environ.get("FEDNODE_HEALTH", "0.0.0.0:8080")
    if not health:
        print("FEDNODE_HEALTH is empty: the node serves no health endpoint")
        return 1
    port = health.rpartition(":")[2]
    url = f"http://127.0.0.1:{port}{path}"
    try:
        with urllib.request.urlopen(url, timeout=3) as resp:
            print(f"{url}: {resp.status}")
            return 0 if resp.status == 200 else 1
    except urllib.error.HTTPError as err:  # 503: alive but not ready
        print(f"{url}: {err.code}")
    except OSError as err:
        print(f"{url}: {err}")
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
