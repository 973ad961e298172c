"""Container engine: OCI bundles, runc/crun driver, rich mode, lxcfs, quota, upgrade, state."""
