"""The Kubernetes side: Istio's injection settings, the capture argv they give a pod, and injection itself.

Imported only by ``inject`` (and the webhook and CNI plugin built on it), never by a plain init-container run.
"""
