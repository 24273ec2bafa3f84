"""Scaling the prefill and decode Deployments through the Kubernetes API's scale subresource.

Plain HTTPS with httpx, no client library: two calls (GET and PATCH .../scale) do not justify
one. In a pod it uses the service account's token (re-read at every call: projected tokens
rotate) and CA; outside, an API URL and a token file. The service account needs get and patch on
deployments/scale in the namespace."""

from __future__ import annotations

import os
import ssl
from pathlib import Path

import httpx

from gateway.planner.adapters import AdapterError

SERVICE_ACCOUNT = Path("/var/run/secrets/kubernetes.io/serviceaccount")
MERGE_PATCH = "application/merge-patch+json"


class KubernetesAdapter:
    def __init__(
        self,
        api_url: str,
        token_file: str | Path | None = None,
        ca_file: str | Path | None = None,
        namespace: str = "kvrelay",
        deployments: dict[str, str] | None = None,
        transport: httpx.BaseTransport | None = None,
        timeout_s: float = 10.0,
    ) -> None:
        self.namespace = namespace
        self.deployments = deployments or {"prefill": "prefill", "decode": "decode"}
        self._token_file = Path(token_file) if token_file else None
        verify: ssl.SSLContext | bool = ssl.create_default_context(cafile=str(ca_file)) if ca_file else True
        self._client = httpx.Client(base_url=api_url.rstrip("/"), verify=verify, timeout=timeout_s, transport=transport)

    @classmethod
    def in_cluster(
        cls,
        namespace: str = "kvrelay",
        deployments: dict[str, str] | None = None,
        account_dir: Path = SERVICE_ACCOUNT,
        transport: httpx.BaseTransport | None = None,
    ) -> KubernetesAdapter:
        host, port = os.environ.get("KUBERNETES_SERVICE_HOST"), os.environ.get("KUBERNETES_SERVICE_PORT", "443")
        if not host or not (account_dir / "token").is_file():
            raise AdapterError(
                "not running in a Kubernetes pod (no KUBERNETES_SERVICE_HOST or no service account token in "
                f"{account_dir}): pass --kube-api and --kube-token-file"
            )
        host = f"[{host}]" if ":" in host else host
        api = f"https://{host}:{port}"
        return cls(api, account_dir / "token", account_dir / "ca.crt", namespace, deployments, transport)

    def current(self) -> dict[str, int]:
        out = {}
        for role, name in self.deployments.items():
            scale = self._call("GET", name)
            out[role] = int(scale.get("spec", {}).get("replicas", 0))  # omitted when 0
        return out

    def apply(self, sizes: dict[str, int]) -> None:
        for role, n in sorted(sizes.items()):
            self._call("PATCH", self.deployments[role], {"spec": {"replicas": n}})

    def _call(self, method: str, name: str, body: dict | None = None) -> dict:
        path = f"/apis/apps/v1/namespaces/{self.namespace}/deployments/{name}/scale"
        headers = {"Accept": "application/json"}
        if self._token_file is not None:
            headers["Authorization"] = f"Bearer {self._token_file.read_text().strip()}"
        if body is not None:
            headers["Content-Type"] = MERGE_PATCH
        try:
            resp = self._client.request(method, path, headers=headers, json=body)
        except httpx.HTTPError as e:
            raise AdapterError(f"kubernetes: {method} {path} failed: {e}") from e
        if resp.status_code >= 400:
            raise AdapterError(f"kubernetes: {method} {path} answered {resp.status_code}: {_why(resp)}")
        return resp.json()

    def close(self) -> None:
        self._client.close()


def _why(resp: httpx.Response) -> str:
    try:
        message = resp.json().get("message", resp.text)
    except ValueError:
        message = resp.text
    hints = {
        401: "the token was refused",
        403: "the service account needs get and patch on deployments/scale in this namespace",
        404: "no such Deployment: check --namespace and the deployment names",
    }
    return f"{message} ({hints[resp.status_code]})" if resp.status_code in hints else message
