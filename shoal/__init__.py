"""Shoal: a decentralized peer-to-peer training daemon.

The one import package Shoal installs. Its layers are the repository's top-level folders, linked here
(`shoal/kernels -> ../kernels`, ...) so that they install, and import, only as `shoal.kernels`,
`shoal.transport`, `shoal.dht`, `shoal.gossip` and `shoal.peer` (docs/design.md says why).
"""
