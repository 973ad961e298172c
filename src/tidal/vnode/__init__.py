"""The Kubernetes virtual node (``tidal virtual-node``): pods bound to it run as instances.

:mod:`.mapping` (pure: pod -> instance spec, instance -> pod status, node, lease),
:mod:`.kube` (the API calls over the official client), :mod:`.node` (the controller loops).
It reaches instances only through the instance API over the daemon's socket.
"""
