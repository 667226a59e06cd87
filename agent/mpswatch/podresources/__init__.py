"""The kubelet's PodResources v1 gRPC API: api.proto (the part mpswatch calls) and the modules
grpcio-tools generated from it (api_pb2*.py; README.md, Dependencies, says how to regenerate them).
Imported only by mpswatch.collectors.pods when the kubelet's socket is there."""
