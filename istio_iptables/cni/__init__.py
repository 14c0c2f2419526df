"""CNI mode: the capture applied by a chained CNI plugin, and the installer that puts it on a node."""
