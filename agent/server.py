"""Serve the API with gunicorn (gthread, one worker): never Flask's dev server.

The app and its services are built in the worker (gunicorn loads the WSGI app after
fork), where the operation pool starts and crash recovery runs. SIGTERM stops taking
work and ends event streams; VMs and containers keep running (they are not children
of the agent), and the next start re-adopts them.
"""
from __future__ import annotations

import logging

from gunicorn.app.base import BaseApplication
from gunicorn.workers.gthread import ThreadWorker

from agent.config import Config

log = logging.getLogger(__name__)


class AgentWorker(ThreadWorker):
    def handle_exit(self, sig, frame):
        services = getattr(self.wsgi, "config", {}).get("SERVICES") if self.wsgi else None
        if services is not None:
            services.stop()  # cancels queued work; running work stops at its next phase boundary
        super().handle_exit(sig, frame)


class AgentServer(BaseApplication):
    def __init__(self, config: Config, app_factory):
        self._config = config
        self._factory = app_factory
        super().__init__()

    def load_config(self):
        api = self._config.api
        settings = {
            "bind": api.listen,
            "workers": 1,  # one worker: the agent owns host state in one process
            "worker_class": "agent.server.AgentWorker",
            "threads": api.threads,
            "timeout": 0,  # long SSE streams and waits must not be killed
            "graceful_timeout": 10,
            "accesslog": None,
            "certfile": api.tls_cert,
            "keyfile": api.tls_key,
            "ca_certs": api.client_ca,
            "limit_request_line": 8190,
            "control_socket_disable": True,  # gunicorn's ~/.gunicorn/gunicorn.ctl: shared by every agent on a host
        }
        if api.client_ca:
            import ssl
            settings["cert_reqs"] = ssl.CERT_REQUIRED
        for key, value in settings.items():
            if value is not None:
                self.cfg.set(key, value)

    def load(self):
        app = self._factory(self._config)
        app.config["SERVICES"].start()  # in the worker, after fork
        log.info("nodeagent serving", extra={"listen": self._config.api.listen,
                                             "tls": bool(self._config.api.tls_cert)})
        return app
