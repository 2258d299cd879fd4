"""The CLI's SOURCE argument of `nodeagent image import` becomes the API's image source."""
import os

from agent.cli import image_source

HEX = "ab" * 32


def test_every_kind_of_source():
    assert image_source("https://x.example/d.qcow2") == {"type": "url", "url": "https://x.example/d.qcow2"}
    assert image_source("docker://reg:5000/busybox:1") == {"type": "registry", "reference": "reg:5000/busybox:1"}
    assert image_source(f"s3://images/sha256:{HEX}") == {"type": "s3", "pool": "images", "digest": f"sha256:{HEX}"}
    assert image_source("s3://images/base/disk.qcow2") == {"type": "s3", "pool": "images", "key": "base/disk.qcow2"}
    assert image_source("disk.qcow2") == {"type": "file", "path": os.path.abspath("disk.qcow2")}
