#!/bin/sh
# Entrypoint of the peer image. As root it does one thing: when ROUTER is set (a peer on a private
# network of the compose swarm), it routes PUBLIC_SUBNET through that NAT router, which needs
# CAP_NET_ADMIN. Then it drops every capability and runs `peer "$@"` as the unprivileged user shoal.
set -eu
if [ -n "${ROUTER:-}" ]; then
	ip route replace "${PUBLIC_SUBNET:?PUBLIC_SUBNET must be set with ROUTER}" via "$ROUTER"
fi
if [ "$(id -u)" = 0 ]; then
	# the state dir may be a fresh volume owned by root
	mkdir -p /var/lib/shoal && chown shoal:shoal /var/lib/shoal
	exec setpriv --reuid=shoal --regid=shoal --init-groups --inh-caps=-all --bounding-set=-all \
		--no-new-privs -- peer "$@"
fi
exec peer "$@"
