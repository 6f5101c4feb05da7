#!/usr/bin/env python3
"""Follow an outflow collector's feed (outflow.v1.Feed): every batch it applies, one JSON
line each, as it applies them.

    python3 outflow_follow.py 127.0.0.1:7411 --state follow.json --start oldest

Needs grpcio, grpcio-tools and protobuf (pip install grpcio grpcio-tools protobuf). The
Python code of the protos is generated at the first run from the repository's proto/
directory (or --proto-dir) into ~/.cache/outflow/pyproto.

Output, one JSON object per line on stdout:
  {"type": "batch", "run_id": ..., "position": ..., "agent_id": ..., "epoch": ..., "seq": ...,
   "host": ..., "start_ms": ..., "end_ms": ...,
   "totals": [{"group": "client-address", "key": "203.0.113.7", "response_bytes": ...,
               "request_bytes": ..., "connections_closed": ...}, ...],
   "deltas": [{"conn_id": ..., "remote": "...", "client": "...", "client_id": "...",
               "bytes_out": ..., "bytes_in": ..., "closed": false}, ...]}
  {"type": "gap", "run_id": ..., "from_position": ..., "to_position": ..., "reason": "..."}
A gap names positions this consumer can no longer get (it fell behind the collector's
buffer, or the collector restarted); it is also said on stderr.

Resuming: with --state FILE, the run id and position of the last event printed are written
to FILE (atomically) after every event, and a later run starts after them. Within a run, the
consumer reconnects by itself from its last position when the collector goes away (backoff
0.2 s to 5 s). A crash between printing an event and saving the state prints that event
again on the next run: at least once, in position order.

Exit status: 0 after --max-batches batches or --idle-exit seconds without an event; 2 when
the collector refuses the request (bad argument, no feed, no permission), with one line on
stderr saying why.
"""

import argparse
import hashlib
import ipaddress
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

GROUPS = {
    "client-address": 1,
    "client-prefix": 2,
    "host": 3,
    "workload": 4,
    "client-id": 5,
    "peer": 6,
}
GROUP_NAMES = {v: k for k, v in GROUPS.items()}
DEFAULT_PROTO_DIR = Path(__file__).resolve().parent.parent.parent / "proto"


def die(msg):
    print(f"outflow_follow: {msg}", file=sys.stderr)
    sys.exit(2)


def load_protos(proto_dir):
    """Generates (once per proto content) and imports the outflow.v1 modules."""
    try:
        from grpc_tools import protoc
    except ImportError:
        die("grpcio-tools is not installed: pip install grpcio grpcio-tools protobuf")
    files = sorted((proto_dir / "outflow" / "v1").glob("*.proto"))
    if not files:
        die(f"no outflow/v1/*.proto under {proto_dir}: pass --proto-dir")
    digest = hashlib.sha256()
    for f in files:
        digest.update(f.name.encode())
        digest.update(f.read_bytes())
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    out = cache / "outflow" / "pyproto" / digest.hexdigest()[:16]
    if not out.is_dir():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=out.parent))
        rc = protoc.main(
            [
                "protoc",
                f"-I{proto_dir}",
                f"--python_out={tmp}",
                f"--grpc_python_out={tmp}",
                *[str(f.relative_to(proto_dir)) for f in files],
            ]
        )
        if rc != 0:
            die(f"protoc failed ({rc}) on {proto_dir}")
        try:
            tmp.rename(out)
        except OSError:
            pass  # another run made it first
    sys.path.insert(0, str(out))
    from outflow.v1 import feed_pb2, feed_pb2_grpc

    return feed_pb2, feed_pb2_grpc


def ip(b):
    return str(ipaddress.ip_address(bytes(b))) if b else ""


def batch_json(b):
    return {
        "type": "batch",
        "run_id": b.run_id,
        "position": b.position,
        "agent_id": b.agent_id,
        "epoch": b.epoch,
        "seq": b.seq,
        "host": b.host,
        "start_ms": b.start_ms,
        "end_ms": b.end_ms,
        "totals": [
            {
                "group": GROUP_NAMES.get(t.group, str(t.group)),
                "key": t.key,
                "response_bytes": t.response_bytes,
                "request_bytes": t.request_bytes,
                "connections_closed": t.connections_closed,
            }
            for t in b.totals
        ],
        "deltas": [
            {
                "conn_id": d.conn_id,
                "remote": ip(d.remote_addr),
                "client": ip(d.client_addr) or ip(d.remote_addr),
                "client_id": d.client_id,
                "bytes_out": d.counters.bytes_out,
                "bytes_in": d.counters.bytes_in,
                "closed": d.closed,
            }
            for d in b.deltas
        ],
    }


class State:
    """The run id and position of the last event printed, kept in a file if given."""

    def __init__(self, path):
        self.path = Path(path) if path else None
        self.run_id, self.position = 0, 0
        if self.path and self.path.exists():
            try:
                s = json.loads(self.path.read_text())
                self.run_id, self.position = int(s["run_id"]), int(s["position"])
            except (ValueError, KeyError, TypeError) as e:
                die(f"--state {self.path}: not a state this program wrote ({e})")

    def save(self, run_id, position):
        self.run_id, self.position = run_id, position
        if self.path:
            tmp = self.path.with_suffix(self.path.suffix + ".tmp")
            tmp.write_text(json.dumps({"run_id": run_id, "position": position}))
            os.replace(tmp, self.path)


def main():
    p = argparse.ArgumentParser(
        description="Follow an outflow collector's applied batches (outflow.v1.Feed) as JSON lines.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 2)[2],
    )
    p.add_argument("address", help="the collector's gRPC address, host:port")
    p.add_argument("--state", help="file of the last position: resume from it, update it")
    p.add_argument("--start", choices=["newest", "oldest"], default="newest",
                   help="where to start without a position of the collector's run (default newest)")
    p.add_argument("--group", action="append", choices=sorted(GROUPS), default=[],
                   help="groups whose totals to receive (repeat; default client-address, client-prefix, client-id)")
    p.add_argument("--host", action="append", default=[], help="only batches of this host (repeat)")
    p.add_argument("--min-response-bytes", type=int, default=0,
                   help="only totals of at least this many response bytes")
    p.add_argument("--include-deltas", action="store_true",
                   help="each batch's deltas too (the collector needs feed.deltas = true)")
    p.add_argument("--token-file", help="file of the read token (Bearer)")
    p.add_argument("--tls-ca", help="PEM CA to verify the collector's certificate (TLS)")
    p.add_argument("--max-batches", type=int, default=0, help="exit after this many batches")
    p.add_argument("--idle-exit", type=float, default=0,
                   help="exit after this many seconds without an event")
    p.add_argument("--proto-dir", type=Path, default=DEFAULT_PROTO_DIR,
                   help=f"directory holding outflow/v1/*.proto (default {DEFAULT_PROTO_DIR})")
    args = p.parse_args()

    import grpc

    feed_pb2, feed_pb2_grpc = load_protos(args.proto_dir)
    metadata = []
    if args.token_file:
        token = Path(args.token_file).read_text().strip()
        metadata.append(("authorization", f"Bearer {token}"))
    if args.tls_ca:
        creds = grpc.ssl_channel_credentials(Path(args.tls_ca).read_bytes())
        channel = grpc.secure_channel(args.address, creds)
    else:
        channel = grpc.insecure_channel(args.address)
    stub = feed_pb2_grpc.FeedStub(channel)
    state = State(args.state)
    batches = 0
    backoff = 0.2
    fatal = {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.UNIMPLEMENTED,
    }
    while True:
        request = feed_pb2.FollowRequest(
            run_id=state.run_id,
            after=state.position,
            start=2 if args.start == "oldest" else 1,
            groups=[GROUPS[g] for g in args.group],
            include_deltas=args.include_deltas,
            hosts=args.host,
            min_response_bytes=args.min_response_bytes,
        )
        call = stub.Follow(request, metadata=metadata)
        idle = threading.Event()
        timer = None

        def arm():
            nonlocal timer
            if timer:
                timer.cancel()
            if args.idle_exit > 0:
                timer = threading.Timer(args.idle_exit, lambda: (idle.set(), call.cancel()))
                timer.daemon = True
                timer.start()

        arm()
        try:
            for event in call:
                arm()
                backoff = 0.2
                kind = event.WhichOneof("event")
                if kind == "batch":
                    b = event.batch
                    print(json.dumps(batch_json(b)), flush=True)
                    state.save(b.run_id, b.position)
                    batches += 1
                    if args.max_batches and batches >= args.max_batches:
                        return 0
                elif kind == "gap":
                    g = event.gap
                    print(json.dumps({
                        "type": "gap",
                        "run_id": g.run_id,
                        "from_position": g.from_position,
                        "to_position": g.to_position,
                        "reason": g.reason,
                    }), flush=True)
                    print(f"outflow_follow: gap: positions {g.from_position}..{g.to_position} of run {g.run_id:x}: {g.reason}",
                          file=sys.stderr)
                    if g.to_position > 0:
                        state.save(g.run_id, g.to_position)
            # The collector ended the stream (it is stopping): follow on from here.
            print(f"outflow_follow: the collector ended the stream; reconnecting in {backoff:.1f}s",
                  file=sys.stderr)
        except grpc.RpcError as e:
            if idle.is_set():
                return 0
            if e.code() in fatal:
                die(f"the collector refused: {e.code().name}: {e.details()}")
            print(f"outflow_follow: {e.code().name}: {e.details()}; reconnecting in {backoff:.1f}s",
                  file=sys.stderr)
        finally:
            if timer:
                timer.cancel()
        if idle.is_set():
            return 0
        time.sleep(backoff)
        backoff = min(backoff * 2, 5.0)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
