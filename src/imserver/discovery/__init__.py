"""Service discovery and the config centre on etcd: the client, an instance's
registration, the watch of a service's instances, the balancer and its circuit
breakers, and the watch of the dynamic settings (docs/architecture.md, "Discovery")."""
