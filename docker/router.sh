#!/bin/sh
# A NAT router of the compose swarm: forwards its private network (eth on PRIVATE_SUBNET) to the
# public one (PUBLIC_SUBNET) through nftables masquerade, and drops every connection the inside did not
# open. NAT_TYPE picks the mapping behaviour (as measured on these kernels, docs/design.md):
#   eim        masquerade, source port kept: endpoint-independent mapping, port-restricted filtering
#   symmetric  masquerade fully-random: a new random port for every destination (symmetric NAT)
set -eu
: "${PRIVATE_SUBNET:?}" "${PUBLIC_SUBNET:?}" "${NAT_TYPE:?}"

# the interface that holds an address in a subnet, e.g. 10.20.0.0/24 -> eth1
iface_in() {
	prefix=$(echo "$1" | cut -d. -f1-3)
	ip -o -4 addr show | awk -v p="$prefix." 'index($4, p) == 1 {print $2; exit}'
}
WAN=$(iface_in "$PUBLIC_SUBNET")
LAN=$(iface_in "$PRIVATE_SUBNET")
[ -n "$WAN" ] && [ -n "$LAN" ] || { echo "router: no interface on $PUBLIC_SUBNET or $PRIVATE_SUBNET" >&2; exit 1; }

case $NAT_TYPE in
eim) MASQ="masquerade" ;;
symmetric) MASQ="masquerade fully-random" ;;
*) echo "router: NAT_TYPE must be eim or symmetric, not $NAT_TYPE" >&2; exit 1 ;;
esac

# The input chain drops what the outside sends to the router itself, as a home router does: without it
# the router's kernel answers a SYN to an unmapped port with a RST, which tears down the very mapping a
# TCP hole punch is opening (the namespace lab's routers, natlab/lab.py, drop it the same way).
nft -f - <<NFT
table ip shoal_nat {
	chain forward {
		type filter hook forward priority filter; policy drop;
		ct state established,related accept
		iifname "$LAN" oifname "$WAN" accept
		counter drop
	}
	chain input {
		type filter hook input priority filter; policy drop;
		iifname "lo" accept
		iifname "$LAN" accept
		ct state established,related accept
	}
	chain postrouting {
		type nat hook postrouting priority srcnat;
		oifname "$WAN" counter $MASQ
	}
}
NFT
echo "router: $NAT_TYPE NAT from $LAN ($PRIVATE_SUBNET) to $WAN ($PUBLIC_SUBNET)" >&2
# stay up (the rules live in this network namespace and go with the container); exit at once on stop
trap 'exit 0' TERM INT
while :; do
	sleep 3600 &
	wait $!
done
