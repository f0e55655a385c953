#!/usr/bin/env python3
"""A small ignite API client in Python: lists VMs and follows the Watch stream.

The stubs come from the checked-in proto, generated where you like (see README.md):

    python -m grpc_tools.protoc -I manifests/proto --python_out=gen --grpc_python_out=gen ignite.proto
    PYTHONPATH=gen python examples/python/ignite_client.py ls

Over the daemon's unix socket (the default, /run/ignite/ignite.sock) nothing else is needed: the daemon
accepts the socket path that gRPC's C core sends as the HTTP/2 authority. Over TCP the daemon asks for
mutual TLS: pass --host HOST:PORT with --ca, --cert and --key.

Commands:
    info               the daemon's version, root and VM counts (Host.Info)
    ls                 the VMs, a line each: name, phase, IP (Vms.List)
    get NAME           one VM, or "not found: <the daemon's message>" and exit status 4 (Vms.Get)
    watch [--events N] follow VM changes, a line each, and stop after N of them (Vms.Watch)
    health             the daemon's health check: SERVING or NOT_SERVING (grpc.health.v1)
    services           the services gRPC reflection lists (grpc.reflection.v1)
"""

import argparse
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

import ignite_pb2
import ignite_pb2_grpc

EXIT_NOT_FOUND = 4


def channel(args):
    """A channel to the daemon: its unix socket, or TCP with mutual TLS."""
    if args.host:
        def read(path):
            with open(path, "rb") as f:
                return f.read()

        credentials = grpc.ssl_channel_credentials(
            root_certificates=read(args.ca), private_key=read(args.key), certificate_chain=read(args.cert)
        )
        return grpc.secure_channel(args.host, credentials)
    return grpc.insecure_channel("unix:" + args.socket)


def cmd_info(ch, args):
    info = ignite_pb2_grpc.HostStub(ch).Info(ignite_pb2.Empty(), timeout=args.timeout)
    print(f"ignite {info.version}: root {info.root}, {info.vms} VMs ({info.running_vms} running)")


def cmd_ls(ch, args):
    reply = ignite_pb2_grpc.VmsStub(ch).List(ignite_pb2.ListVmsRequest(), timeout=args.timeout)
    for vm in reply.vms:
        print(f"{vm.name} {vm.status.phase or '-'} {vm.status.ip or '-'}")
    print(f"{len(reply.vms)} VMs at revision {reply.revision}")


def cmd_get(ch, args):
    try:
        vm = ignite_pb2_grpc.VmsStub(ch).Get(ignite_pb2.VmName(name=args.name), timeout=args.timeout)
    except grpc.RpcError as e:
        if e.code() == grpc.StatusCode.NOT_FOUND:
            print(f"not found: {e.details()}")
            return EXIT_NOT_FOUND
        raise
    print(f"{vm.name} {vm.status.phase or '-'} image {vm.image}")
    return 0


def cmd_watch(ch, args):
    kinds = {v: k for k, v in ignite_pb2.VmEvent.Kind.items()}
    stream = ignite_pb2_grpc.VmsStub(ch).Watch(ignite_pb2.WatchVmsRequest())
    seen = 0
    for event in stream:
        print(f"{kinds.get(event.kind, event.kind)} {event.name} at revision {event.revision}", flush=True)
        seen += 1
        if args.events and seen >= args.events:
            stream.cancel()
            break


def cmd_health(ch, args):
    reply = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=args.timeout)
    print(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))


def cmd_services(ch, args):
    stub = reflection_pb2_grpc.ServerReflectionStub(ch)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    for reply in stub.ServerReflectionInfo(iter([request]), timeout=args.timeout):
        for service in reply.list_services_response.service:
            print(service.name)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--socket", default="/run/ignite/ignite.sock", help="the daemon's unix socket")
    parser.add_argument("--host", help="HOST:PORT of a daemon serving the API over TCP (--listen)")
    parser.add_argument("--ca", help="with --host: the CA that signed the daemon's certificate")
    parser.add_argument("--cert", help="with --host: this client's certificate")
    parser.add_argument("--key", help="with --host: this client's key")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds per call")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info")
    sub.add_parser("ls")
    get = sub.add_parser("get")
    get.add_argument("name")
    watch = sub.add_parser("watch")
    watch.add_argument("--events", type=int, default=0, help="stop after this many events (0: never)")
    sub.add_parser("health")
    sub.add_parser("services")
    args = parser.parse_args()
    if args.host and not (args.ca and args.cert and args.key):
        parser.error("--host needs --ca, --cert and --key (the daemon asks for mutual TLS)")
    commands = {
        "info": cmd_info, "ls": cmd_ls, "get": cmd_get, "watch": cmd_watch,
        "health": cmd_health, "services": cmd_services,
    }
    with channel(args) as ch:
        try:
            return commands[args.command](ch, args) or 0
        except grpc.RpcError as e:
            print(f"error: {e.code().name}: {e.details()}", file=sys.stderr)
            return 1


if __name__ == "__main__":
    sys.exit(main())
