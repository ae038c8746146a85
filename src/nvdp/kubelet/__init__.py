"""The kubelet front: device-plugin gRPC servers, registration, the manager, the generated proto."""
