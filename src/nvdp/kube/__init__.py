"""The Kubernetes API edge: connection settings, the client calls, following a Node, Events."""
