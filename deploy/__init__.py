"""Deployment over gRPC on Flower 1.39: one SuperLink, N SuperNodes, TLS and node authentication.

``spec`` (ports, images, command lines: the one source of truth), ``certs`` (CA, server
certificate, node keys), ``local`` (a real federation on this machine; ``stamen deploy local``),
``procs`` (start/stop processes, grandchildren included), ``proxy`` (bytes on the wire),
``netns`` (SuperLink and SuperNodes in separate network namespaces), ``cli`` (``stamen deploy``).
Rounds at simulation speed: ``supernode`` (Flower's SuperNode, paced, serving its ClientApps
warm), ``clientapp`` (the runner, the warm ClientApp worker and the zygote that forks it),
``pacing`` (every poll interval on a round's path, and the patch of Flower's SuperNode loop),
``envelope`` (a message's content as one Flower object between Stamen's two ends).
The Docker, Kubernetes and Ray files live next to them; DEPLOY.md is the guide.
"""
