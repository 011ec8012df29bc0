"""Kubernetes namespaces in Calico's model (the CONTRACT's convention): names and one rule.

A namespace's labels live on the Profile ``kns.<namespace>`` (``spec.labelsToApply``);
namespaceSelectors match them as they are; endpoints in the namespace carry them prefixed
``pcns.``. As the Kubernetes API server does for every namespace, a namespace always has the label
``kubernetes.io/metadata.name: <namespace>``, whether or not its profile exists or says so, so
upstream policies that select namespaces by name work unchanged. Pure: names and dictionaries only,
no datastore access.
"""

from __future__ import annotations

from collections.abc import Mapping

PROFILE_PREFIX = "kns."
LABEL_PREFIX = "pcns."
NAME_LABEL = "kubernetes.io/metadata.name"


def profile_name(namespace: str) -> str:
    return PROFILE_PREFIX + namespace


def namespace_of(profile: str) -> str | None:
    """The namespace whose labels ``profile`` holds, or None for any other profile."""
    return profile[len(PROFILE_PREFIX):] if profile.startswith(PROFILE_PREFIX) else None


def namespace_labels(namespace: str, labels_to_apply: Mapping[str, str] | None = None) -> dict[str, str]:
    """The labels of ``namespace`` given its profile's ``labelsToApply`` (None: it has no profile).
    The name label is the API server's to set: a profile cannot give it another value."""
    return {**(labels_to_apply or {}), NAME_LABEL: namespace}
