"""The local cluster of the distributed mode: the processes ``imserver cluster`` runs
on one machine (etcd, HAProxy, the service processes) for development and tests."""
