"""Launchers and builders of real components for tests, benchmarks and scripts.

Nothing here imports pytest: pytest fixtures live in tests/ and call into these modules.

- libvirt_daemon: start (or find) libvirtd + virtlogd, stop them by PID
- ceph_cluster: a throw-away Ceph through scripts/ceph-dev-cluster, backends on it
- registry_server: a docker-registry on 127.0.0.1, the busybox test image pushed to it
- ocibuild: OCI layouts, docker-save archives and layers built in memory
- runtimes: container runtimes by kind, busybox rootfs dirs, specs, free ports
- agentproc: a real agent process (`python -m agent serve`) and its API client
- harness: simulated hosts (netns + mount namespace, own libvirtd and agent each)
"""
