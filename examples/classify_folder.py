"""Classify a folder of photos through a running classify-app service.

    python examples/classify_folder.py PHOTOS_DIR --url http://127.0.0.1:6066 [--host 127.0.0.1]

The service downloads images by URL, so this script serves the folder over HTTP itself (on
`--host`, an address the workers can reach; a private one must be in the workers'
`CLASSIFY_DOWNLOAD_ALLOW_NETS`), submits one ad per photo with the blocking client, waits for
every result and prints a table: file, status, category, top label.
"""

from __future__ import annotations

import argparse
import functools
import threading
import uuid
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import quote

from classify_app.sdk import ClassifyClient

PHOTO_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"}


class QuietHandler(SimpleHTTPRequestHandler):
    """Serves the folder without a log line per request."""

    def log_message(self, format: str, *args: object) -> None:
        """Silence the default access log."""


def classify_folder(folder: Path, url: str, host: str, token: str | None) -> list[str]:
    """Serve `folder`, classify every photo in it, return the table's lines."""
    photos = sorted(p for p in folder.iterdir() if p.suffix.lower() in PHOTO_SUFFIXES)
    handler = functools.partial(QuietHandler, directory=str(folder))
    server = ThreadingHTTPServer((host, 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://{host}:{server.server_address[1]}"
    run = uuid.uuid4().hex[:6]
    lines = []
    try:
        with ClassifyClient(url, token=token) as client:
            accepted = {
                photo.name: client.submit(
                    {
                        "ad_id": f"folder-{run}-{number}",
                        "catalog_name": "folder",
                        "images": [f"{base}/{quote(photo.name)}"],
                    }
                )
                for number, photo in enumerate(photos)
            }
            for name, acceptance in accepted.items():
                result = client.wait(acceptance.ad_id, timeout=120)
                image = result.images[0]
                top = image.labels[0].name if image.labels else image.error and image.error.reason
                lines.append(f"{name:<32} {result.status:<8} {result.category or '-':<14} {top}")
    finally:
        server.shutdown()
    return lines


def main() -> None:
    """Parse the arguments and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--url", default="http://127.0.0.1:6066", help="a worker's address")
    parser.add_argument("--host", default="127.0.0.1", help="address to serve the photos on")
    parser.add_argument("--token", default=None, help="bearer token, if the API needs one")
    args = parser.parse_args()
    for line in classify_folder(args.folder, args.url, args.host, args.token):
        print(line)


if __name__ == "__main__":
    main()
