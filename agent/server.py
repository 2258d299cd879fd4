"""Serve the API with gunicorn (gthread, one worker): never Flask's dev server."""
from __future__ import annotations

from gunicorn.app.base import BaseApplication

from agent.config import Config


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
            "worker_class": "gthread",
            "threads": api.threads,
            "timeout": 0,  # long SSE streams and waits must not be killed
            "graceful_timeout": 10,
            "accesslog": None,
            "certfile": api.tls_cert,
            "keyfile": api.tls_key,
            "ca_certs": api.client_ca,
        }
        if api.client_ca:
            import ssl
            settings["cert_reqs"] = ssl.CERT_REQUIRED
        for key, value in settings.items():
            if value is not None:
                self.cfg.set(key, value)

    def load(self):
        return self._factory(self._config)
