"""Lists a server's services with grpcio-reflection's client (reflection v1alpha), as Python users'
tools do: prints one name per line. Usage: reflection_services.py HOST:PORT TOKEN"""
import sys

import grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

address, token = sys.argv[1:3]


class Bearer(grpc.UnaryStreamClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Adds the bearer token to every call (reflection is a stream-stream call)."""

    def _with_token(self, details):
        metadata = list(details.metadata or []) + [("authorization", f"Bearer {token}")]
        return details._replace(metadata=metadata)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._with_token(details), request)

    def intercept_stream_stream(self, continuation, details, requests):
        return continuation(self._with_token(details), requests)


channel = grpc.intercept_channel(grpc.insecure_channel(address), Bearer())
database = ProtoReflectionDescriptorDatabase(channel)
for name in database.get_services():
    print(name)
# The service's methods resolve through reflection too (file descriptors by symbol).
for name in database.get_services():
    if name.startswith("distill.v1."):
        print("file:", database.FindFileContainingSymbol(name).name)
