"""The NAT lab: network namespaces, kernel NAT routers, delay lines and lab agents, for the NAT tests and
`bench.natlab`. Test infrastructure, not part of the installed `shoal` package."""
