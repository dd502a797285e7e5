"""Trusted-node key relay between KMEs that are not neighbours (issue 11), sans-I/O.

`topology` holds the network graph, node-disjoint path selection and the link-state
database; `relay` the per-KME relay core and its messages; `errors` the layer's one
error type; `constants` every length and time limit. Nothing here opens a socket or
runs an event loop: cores take bytes and the time, and return bytes and events.
See docs/network.md.
"""
