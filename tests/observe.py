"""Helpers for the observability tests: reverstd with a management listener, /metrics parsing."""
from __future__ import annotations

import signal
import time

import requests
from prometheus_client.parser import text_string_to_metric_families

from .conftest import Server

MANAGEMENT_LINE = r'management on tcp ([^\s"]+)'


class ManagedServer(Server):
    """reverstd on ephemeral ports with ``--management-address 127.0.0.1:0``."""

    def __init__(self, certs, groups_path, extra=()):
        try:
            super().__init__(certs, groups_path, extra=["--management-address", "127.0.0.1:0", *extra])
            self.management = self.wait_for(MANAGEMENT_LINE).group(1)  # logged before the ready line
        except BaseException:
            if getattr(self, "popen", None) is not None:
                self.stop(signal.SIGKILL)  # never leave a reverstd behind
            raise

    def mgmt(self, path: str) -> str:
        return f"http://{self.management}{path}"

    def get(self, path: str, **kwargs) -> requests.Response:
        return requests.get(self.mgmt(path), timeout=5, **kwargs)

    def metrics(self) -> "Metrics":
        response = self.get("/metrics")
        assert response.status_code == 200
        return Metrics(response.text)


class Metrics:
    """/metrics parsed with prometheus_client's parser: ``m["name", {"label": "v"}]`` is the
    sample's value (0 when absent), ``m.families`` the parsed families by name."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.families = {f.name: f for f in text_string_to_metric_families(text)}
        self.samples = {}
        for family in self.families.values():
            for sample in family.samples:
                self.samples[(sample.name, frozenset(sample.labels.items()))] = sample.value

    def __getitem__(self, key) -> float:
        name, labels = key if isinstance(key, tuple) else (key, {})
        return self.samples.get((name, frozenset(labels.items())), 0.0)

    def label_names(self, family: str) -> set[str]:
        return {name for sample in self.families[family].samples for name in sample.labels}


def eventually(check, timeout: float = 10.0, interval: float = 0.05):
    """Call ``check()`` until it returns a truthy value (returned) or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not true within {timeout}s: {check}")
        time.sleep(interval)
