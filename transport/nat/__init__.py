"""NAT traversal: how a peer behind a NAT reaches the others of its run, and says which path it uses.

    paths.py         NatService: start-up (reachability, reservations), connect (direct, then reversal,
                     TCP punch, ICE, else relay), maintenance, per-partner path/RTT/throughput report
    reachability.py  AutoNAT-style dial-back: public, private or firewalled
    relay.py         circuit-relay-v2-style relay: reservations, limited circuits, secure end to end
    holepunch.py     DCUtR-style coordination over the relay: TCP simultaneous open, port prediction
                     against one symmetric NAT, connection reversal, ICE signalling
    ice.py           ICE over UDP through aiortc (our STUN, TURN when configured) as a byte transport
    stun.py          STUN Binding codec, the responder public peers serve, UDP and TCP clients
    conduit.py       runs the Host's Noise + yamux upgrade over any byte pipe (relay stream, punched socket)

The NAT lab that tests all this (namespaces, nftables NATs, delay lines) is test infrastructure: natlab/.
"""
