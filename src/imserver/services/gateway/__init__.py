"""The gateway service: client connections, protocol conversion, edge policy, fan-out."""
