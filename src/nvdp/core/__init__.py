"""The pure core: device model, resource building, MIG naming, topology and scoring, allocation,
container edits and health policy. No grpc, no pynvml, no servers, no I/O."""
