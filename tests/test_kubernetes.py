"""deploy/kubernetes/: the promises docs/deploy.md makes about the manifests.

CI validates them against the API schemas (`kubernetes-validate --strict`); these tests pin
what a schema cannot: the spool on a claim, the probes' paths, who the policy admits.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

KUBE = Path(__file__).parent.parent / "deploy" / "kubernetes"


def manifest(name: str) -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load((KUBE / name).read_text())
    return doc


def relayd_container(doc: dict[str, Any]) -> dict[str, Any]:
    containers = doc["spec"]["template"]["spec"]["containers"]
    return next(c for c in containers if c["name"] == "relayd")


def test_spool_is_a_persistent_volume_claim_never_an_empty_dir():
    """Both patterns mount /var/lib/relayd from volumeClaimTemplates; no emptyDir anywhere."""
    for name in ("statefulset.yaml", "sidecar-example.yaml"):
        doc = manifest(name)
        claims = [t["metadata"]["name"] for t in doc["spec"]["volumeClaimTemplates"]]
        mounts = {m["mountPath"]: m["name"] for m in relayd_container(doc)["volumeMounts"]}
        assert mounts["/var/lib/relayd"] in claims, name
        volumes = doc["spec"]["template"]["spec"]["volumes"]
        assert not [v for v in volumes if "emptyDir" in v], name


def test_probes_use_healthz_and_readyz_on_the_metrics_port():
    """Liveness on /healthz, readiness and startup on /readyz, and metrics listen for them."""
    for name in ("statefulset.yaml", "sidecar-example.yaml"):
        c = relayd_container(manifest(name))
        assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
        assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
        assert c["startupProbe"]["httpGet"]["path"] == "/readyz"
        env = {e["name"]: e.get("value") for e in c["env"]}
        assert env["RELAYD_METRICS_LISTEN"].endswith(":9025")


def test_password_comes_from_the_secret_as_a_file():
    """RELAYD_UPSTREAM_PASSWORD_FILE points into the mounted Secret; no password in env."""
    doc = manifest("statefulset.yaml")
    c = relayd_container(doc)
    env = {e["name"]: e.get("value") for e in c["env"]}
    mount = next(m for m in c["volumeMounts"] if m["name"] == "upstream-password")
    assert env["RELAYD_UPSTREAM_PASSWORD_FILE"].startswith(mount["mountPath"] + "/")
    assert "RELAYD_UPSTREAM_PASSWORD" not in env
    volume = next(v for v in doc["spec"]["template"]["spec"]["volumes"] if "secret" in v)
    assert volume["secret"]["secretName"] == manifest("secret.yaml")["metadata"]["name"]


def test_network_policy_admits_only_the_app_on_1025():
    """One ingress rule: pods labelled relayd-client=true, TCP 1025; the shared relayd is open
    beyond loopback, so it must also say who may submit (allowed_networks)."""
    policy = manifest("networkpolicy.yaml")["spec"]
    assert policy["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "relayd"}
    (rule,) = policy["ingress"]
    assert rule["from"] == [{"podSelector": {"matchLabels": {"relayd-client": "true"}}}]
    assert rule["ports"] == [{"protocol": "TCP", "port": 1025}]
    env = {e["name"]: e.get("value") for e in relayd_container(manifest("statefulset.yaml"))["env"]}
    assert env["RELAYD_LISTEN_ALLOWED_NETWORKS"]


def test_sidecar_listens_on_loopback_without_allowed_networks():
    """In the app's pod relayd binds 127.0.0.1, so no allowed_networks is needed or set."""
    env = {
        e["name"]: e.get("value") for e in relayd_container(manifest("sidecar-example.yaml"))["env"]
    }
    assert env["RELAYD_LISTEN_HOST"] == "127.0.0.1"
    assert "RELAYD_LISTEN_ALLOWED_NETWORKS" not in env
