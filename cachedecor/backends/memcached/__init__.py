"""memcached: the protocol, a cluster of nodes, the store and the dogpile backend."""
