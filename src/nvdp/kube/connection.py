"""Where the Kubernetes API server is and how to authenticate: in-cluster or a kubeconfig file.

Plain values in, plain values out: the CLI reads the environment (KUBECONFIG,
KUBERNETES_SERVICE_HOST, KUBERNETES_SERVICE_PORT) and passes what it found; nothing here reads
`os.environ`. The client library is not imported here (kube/client.py turns these values into its
configuration), so checking the settings costs no start-up time.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from nvdp.errors import KubeConfigError

SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"


@dataclass(frozen=True)
class InCluster:
    """The pod's service account: the API server's address from the KUBERNETES_SERVICE_* env vars,
    the CA and the token from the mounted service-account folder. The token file is re-read on
    every request: bound service-account tokens expire and the kubelet rotates the file."""

    server: str
    ca_file: str
    token_file: str
    namespace: str

    @property
    def source(self) -> str:
        return f"in-cluster ({self.server})"


@dataclass(frozen=True)
class Kubeconfig:
    """A kubeconfig file (development, or a node outside the cluster); `context` None = its current one."""

    path: str
    context: str | None = None

    @property
    def source(self) -> str:
        return f"kubeconfig {self.path}" + (f" (context {self.context})" if self.context else "")


@dataclass(frozen=True)
class Direct:
    """An API server at a plain URL with an optional bearer token (tests, `nvdp demo`)."""

    server: str
    token: str | None = None

    @property
    def source(self) -> str:
        return self.server


ClientConfig = InCluster | Kubeconfig | Direct


def in_cluster(host: str | None, port: str | None, account_dir: str = SERVICE_ACCOUNT_DIR) -> InCluster:
    """The in-cluster settings, checked now so that a missing piece is named at start-up."""
    if not host or not port:
        raise KubeConfigError(
            "KUBERNETES_SERVICE_HOST/KUBERNETES_SERVICE_PORT",
            "not set (not running in a pod?); set KUBECONFIG (or --kubeconfig) to a kubeconfig file instead",
        )
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise KubeConfigError("KUBERNETES_SERVICE_PORT", f"{port!r} is not a port number")
    token_file = os.path.join(account_dir, "token")
    ca_file = os.path.join(account_dir, "ca.crt")
    for path, what in ((token_file, "service-account token"), (ca_file, "cluster CA certificate")):
        if not os.path.isfile(path):
            raise KubeConfigError(
                what, f"{path} is missing (is the service account token mounted? "
                "automountServiceAccountToken must not be false)",
            )
    namespace_file = os.path.join(account_dir, "namespace")
    try:
        with open(namespace_file, encoding="utf-8") as f:
            namespace = f.read().strip() or "default"
    except FileNotFoundError:
        namespace = "default"
    bracketed = f"[{host}]" if ":" in host else host  # an IPv6 service address
    return InCluster(f"https://{bracketed}:{port}", ca_file, token_file, namespace)


def client_config(kubeconfig: str | None, host: str | None, port: str | None,
                  account_dir: str = SERVICE_ACCOUNT_DIR) -> ClientConfig:
    """As the official config-manager (client-go's BuildConfigFromFlags): a kubeconfig path when
    one is given (KUBECONFIG or --kubeconfig), else the in-cluster service account. The official
    chart sets KUBECONFIG="" to mean in-cluster."""
    if kubeconfig:
        if not os.path.isfile(kubeconfig):
            raise KubeConfigError("KUBECONFIG", f"{kubeconfig} is not a file")
        return Kubeconfig(kubeconfig)
    return in_cluster(host, port, account_dir)
