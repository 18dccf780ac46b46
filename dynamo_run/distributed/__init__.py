"""Distribution over NATS: the embedded server, connections, discovery and the request plane."""
