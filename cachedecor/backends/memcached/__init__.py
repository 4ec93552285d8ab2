"""memcached: the protocol, its two transports, a cluster of nodes, the store and the dogpile backend."""
