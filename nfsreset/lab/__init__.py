"""The failover lab: namespaces that behave like two NFS heads and a client."""
