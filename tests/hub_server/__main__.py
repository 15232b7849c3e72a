"""Manual use of the test Hub: `cd tests && python -m hub_server [ROOT]` serves ROOT (or a fresh temp dir).
Any token may write (tokens=None); point a client at it with the HF_ENDPOINT it prints."""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from .server import HubServer

server = HubServer(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp())).start()
print(f"HF_ENDPOINT={server.url}  (tokens=None: any token writes)", flush=True)
try:
    while True:
        time.sleep(3600)
except KeyboardInterrupt:
    server.stop()
