"""Kademlia DHT: peer discovery and run rendezvous.

One file per concept, sans-I/O at the core:
  keys.py      256-bit ids (SHA-256 of the PeerID), XOR distance, run and record keys
  routing.py   k-buckets (k = 20) with replacement caches, ping-before-evict, refresh targets
  lookup.py    the iterative lookup over disjoint paths (S/Kademlia) as a state machine
  records.py   Ed25519-signed value and provider records (seq, expiry) and the quota-bounded store
  protocol.py  the six RPCs as bounded msgpack messages (PROTOCOL_ID "/shoal/kad/1.0.0")
  core.py      the node without I/O: answers requests, turns lookups into requests and results
  node.py      the asyncio driver on the transport Host (or plain TCP): DHTNode
  sim.py       thousands of nodes in one process over a simulated network (bench.dht_sim)

For the daemon::

    node = await DHTNode.on_host(host, key, bootstrap=["/ip4/1.2.3.4/tcp/4001"], table_path=path)
    await node.announce_run(run_id, addrs)          # republished until withdraw_run / close
    peers = await node.find_run_peers(run_id)       # [(peer_id multihash bytes, [multiaddr, ...])]
    node.withdraw_run(run_id)
    await node.close()                              # saves the routing table to table_path
"""
