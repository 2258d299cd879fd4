"""hypervisor.seed / hypervisor.iso9660, read back by independent tools (xorriso, blkid)."""
from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from agent.errors import InvalidInput
from hypervisor.iso9660 import write_iso
from hypervisor.seed import make_seed


def need(tool):
    if shutil.which(tool) is None:
        pytest.fail(f"{tool} missing: apt-get install -y xorriso util-linux (or run scripts/setup-host)")


def extract(iso, dest):
    need("xorriso")
    subprocess.run(["xorriso", "-osirrox", "on", "-indev", iso, "-extract", "/", str(dest)],
                   check=True, capture_output=True)
    return {n.lower(): (dest / n).read_text() for n in os.listdir(dest)}


def test_seed_reads_back_with_xorriso_and_blkid(tmp_path):
    iso = make_seed(str(tmp_path / "seed.iso"), instance_id="iid-42", hostname="web-1",
                    user_data="#cloud-config\npackages: [htop]\n",
                    network_config="version: 2\nethernets: {}\n")
    files = extract(iso, tmp_path / "out")
    assert files == {"meta-data": "instance-id: iid-42\nlocal-hostname: web-1\n",
                     "user-data": "#cloud-config\npackages: [htop]\n",
                     "network-config": "version: 2\nethernets: {}\n"}
    need("blkid")
    out = subprocess.run(["blkid", "-o", "export", iso], check=True, capture_output=True, text=True).stdout
    assert "LABEL=cidata" in out and "TYPE=iso9660" in out


def test_default_user_data_and_no_network_config(tmp_path):
    files = extract(make_seed(str(tmp_path / "s.iso"), instance_id="i", hostname="h"), tmp_path / "o")
    assert files["user-data"].startswith("#cloud-config") and "network-config" not in files


def test_multi_sector_file_survives(tmp_path):
    big = ("x" * 70 + "\n") * 200  # ~14 KiB: several sectors
    write_iso(str(tmp_path / "b.iso"), {"user-data": big.encode(), "meta-data": b""}, volume_id="cidata")
    files = extract(str(tmp_path / "b.iso"), tmp_path / "o")
    assert files == {"user-data": big, "meta-data": ""}


@pytest.mark.parametrize("kw", [dict(instance_id="a\nb", hostname="h"), dict(instance_id="i", hostname=""),
                                dict(instance_id="i", hostname="a:b")])
def test_bad_meta_data_leaves_nothing(tmp_path, kw):
    with pytest.raises(InvalidInput):
        make_seed(str(tmp_path / "s.iso"), **kw)
    assert os.listdir(tmp_path) == []
