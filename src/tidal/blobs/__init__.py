"""Where bytes come from: local blob store, OCI registry client, chunk cache, P2P."""
