"""The dev cluster the Ceph suites run on: up, isolated, and S3 reachable."""
import json

import pytest

pytestmark = pytest.mark.real


def test_cluster_is_healthy_with_one_osd_and_rgw(ceph):
    st = json.loads(ceph.run("ceph", "-s", "-f", "json").stdout)
    assert st["fsid"] == ceph.fsid
    assert st["osdmap"]["num_up_osds"] == 1
    pools = ceph.run("ceph", "osd", "pool", "ls").stdout.split()
    assert ceph.rbd_pool in pools
    assert ceph.mon.startswith("127.0.0.1:")
    assert ceph.s3_endpoint.startswith("http://127.0.0.1:")


def test_s3_user_sees_its_bucket(ceph):
    import boto3

    s3 = boto3.client("s3", endpoint_url=ceph.s3_endpoint, region_name=ceph.s3_region,
                      aws_access_key_id=ceph.s3_access_key,
                      aws_secret_access_key=ceph.s3_secret_key)
    assert ceph.s3_bucket in [b["Name"] for b in s3.list_buckets()["Buckets"]]
