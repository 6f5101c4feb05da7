"""An OTLP/gRPC metrics receiver for the collector's tests: the OpenTelemetry project's
generated service (PyPI opentelemetry-proto) served by grpcio, as an OpenTelemetry Collector's
otlp receiver would serve it.

    python otlp_receiver.py PORT [--reject N]

Prints `listening PORT` once it serves on 127.0.0.1:PORT, then one JSON line per Export call:

    {"resource": {"service.name": "..."}, "scope": "...", "metrics": [
        {"name": "...", "unit": "...", "kind": "gauge" | "sum", "monotonic": bool,
         "cumulative": bool, "points": [{"attributes": {...}, "value": int,
         "start": int, "time": int}]}]}

With --reject N, every answer reports N rejected data points (OTLP partial success).
"""

import argparse
import json
import sys
from concurrent import futures

import grpc
from opentelemetry.proto.collector.metrics.v1 import (
    metrics_service_pb2,
    metrics_service_pb2_grpc,
)
from opentelemetry.proto.metrics.v1 import metrics_pb2


def attributes(kvs):
    out = {}
    for kv in kvs:
        which = kv.value.WhichOneof("value")
        out[kv.key] = getattr(kv.value, which) if which else None
    return out


def flatten(request):
    pushes = []
    for rm in request.resource_metrics:
        for sm in rm.scope_metrics:
            metrics = []
            for m in sm.metrics:
                kind = m.WhichOneof("data")
                if kind == "gauge":
                    data, monotonic, cumulative = m.gauge, False, False
                elif kind == "sum":
                    data = m.sum
                    monotonic = data.is_monotonic
                    cumulative = (
                        data.aggregation_temporality
                        == metrics_pb2.AGGREGATION_TEMPORALITY_CUMULATIVE
                    )
                else:
                    raise ValueError(f"unexpected metric kind {kind} of {m.name}")
                points = []
                for p in data.data_points:
                    if p.WhichOneof("value") != "as_int":
                        raise ValueError(f"{m.name}: a point that is not an integer")
                    points.append(
                        {
                            "attributes": attributes(p.attributes),
                            "value": p.as_int,
                            "start": p.start_time_unix_nano,
                            "time": p.time_unix_nano,
                        }
                    )
                metrics.append(
                    {
                        "name": m.name,
                        "unit": m.unit,
                        "kind": kind,
                        "monotonic": monotonic,
                        "cumulative": cumulative,
                        "points": points,
                    }
                )
            pushes.append(
                {
                    "resource": attributes(rm.resource.attributes),
                    "scope": sm.scope.name,
                    "metrics": metrics,
                }
            )
    return pushes


class Metrics(metrics_service_pb2_grpc.MetricsServiceServicer):
    def __init__(self, reject):
        self.reject = reject

    def Export(self, request, context):
        for push in flatten(request):
            print(json.dumps(push), flush=True)
        response = metrics_service_pb2.ExportMetricsServiceResponse()
        if self.reject:
            response.partial_success.rejected_data_points = self.reject
            response.partial_success.error_message = "rejected by the test receiver"
        return response


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("port", type=int)
    parser.add_argument("--reject", type=int, default=0)
    args = parser.parse_args()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(
        Metrics(args.reject), server
    )
    port = server.add_insecure_port(f"127.0.0.1:{args.port}")
    if port == 0:
        sys.exit(f"cannot listen on 127.0.0.1:{args.port}")
    server.start()
    print(f"listening {port}", flush=True)
    server.wait_for_termination()


if __name__ == "__main__":
    main()
