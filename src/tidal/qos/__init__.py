"""Node QoS agent: collector -> aggregator -> policy engine -> executor on cgroups."""
