"""A real OTLP/HTTP trace receiver for the tests: decodes what exporters POST to /v1/traces with the
opentelemetry-proto messages (the wire format a Collector reads), and keeps every span it was sent."""

import gzip
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span as SpanMessage
from opentelemetry.proto.trace.v1.trace_pb2 import Status
from tests.conftest import poll


def plain(value: AnyValue) -> Any:
    """The Python value of an OTLP attribute value."""
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [plain(item) for item in value.array_value.values]
    if kind == "kvlist_value":
        return {item.key: plain(item.value) for item in value.kvlist_value.values}
    return getattr(value, kind) if kind else None


@dataclass
class Span:
    """One received span, decoded."""

    name: str
    trace_id: str
    span_id: str
    parent_span_id: str
    trace_state: str
    kind: str
    status: str
    attributes: dict[str, Any]
    events: list[tuple[str, dict[str, Any]]]
    resource: dict[str, Any] = field(repr=False)


class OtlpReceiver:
    """Listens on 127.0.0.1 (a free port) until `close()`; `endpoint` is what OTEL_EXPORTER_OTLP_ENDPOINT
    takes. Answers every export with 200 and an empty ExportTraceServiceResponse, as a Collector does."""

    def __init__(self) -> None:
        self.spans: list[Span] = []
        self.requests = 0
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                if self.path != "/v1/traces" or self.headers.get("Content-Type") != "application/x-protobuf":
                    self.send_error(404)
                    return
                message = ExportTraceServiceRequest()
                message.ParseFromString(body)
                receiver.add(message)
                answer = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args: Any) -> None:
                """Quiet."""

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def add(self, message: ExportTraceServiceRequest) -> None:
        """Keep the spans of one export request."""
        decoded = []
        for resource_spans in message.resource_spans:
            resource = {a.key: plain(a.value) for a in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    decoded.append(
                        Span(
                            name=span.name,
                            trace_id=span.trace_id.hex(),
                            span_id=span.span_id.hex(),
                            parent_span_id=span.parent_span_id.hex(),
                            trace_state=span.trace_state,
                            kind=SpanMessage.SpanKind.Name(span.kind),
                            status=Status.StatusCode.Name(span.status.code),
                            attributes={a.key: plain(a.value) for a in span.attributes},
                            events=[
                                (event.name, {a.key: plain(a.value) for a in event.attributes})
                                for event in span.events
                            ],
                            resource=resource,
                        )
                    )
        with self._lock:
            self.requests += 1
            self.spans.extend(decoded)

    def trace(self, trace_id: str) -> list[Span]:
        """The spans received so far of one trace."""
        with self._lock:
            return [span for span in self.spans if span.trace_id == trace_id]

    def wait_for(self, found: Callable[[], Any], timeout: float = 20) -> Any:
        """Poll until `found()` is truthy and return it; fail the test after `timeout` seconds."""
        return poll(found, timeout, f"not received within {timeout} s; spans so far: {self.spans}")

    def close(self) -> None:
        """Stop listening."""
        self.server.shutdown()
        self.server.server_close()
