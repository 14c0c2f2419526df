"""CNI mode: the ``istio-iptables-cni`` plugin (``plugin``, ``protocol``, ``kubeapi``) and its installer.

Imported only by the plugin executable and ``istio-iptables cni``, never by a plain init-container run.
"""
