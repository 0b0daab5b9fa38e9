"""OpenTelemetry server spans, continuing a caller's W3C ``traceparent`` when sent."""

from __future__ import annotations

from google.protobuf.message import Message
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from server.domain.common.errors import Code
from server.logs import trace_id_var
from server.pipeline import Call, Handler, MethodInfo, outcome_of


class TracingStage:
    """One SERVER span per call, with the RPC semantic-convention attributes.

    With no exporter configured nothing would ever see a span, so none is made (the request
    context stage has already bound a trace id for the logs). With one, the span's trace
    id is bound instead, for the rest of the call (the context stage unbinds it at the end).
    """

    def __init__(self, tracer: trace.Tracer, *, enabled: bool) -> None:
        self._tracer = tracer
        self._enabled = enabled
        self._propagator = TraceContextTextMapPropagator()

    def wrap(self, method: MethodInfo, handler: Handler) -> Handler:
        if not self._enabled:
            return handler
        tracer, propagator = self._tracer, self._propagator
        span_name = f"{method.service}/{method.name}"
        attributes = {
            "rpc.system": "grpc",
            "rpc.service": method.service,
            "rpc.method": method.name,
        }

        async def handle(request: Message, call: Call) -> Message:
            parent = propagator.extract(call.metadata) if "traceparent" in call.metadata else None
            with tracer.start_as_current_span(
                span_name,
                context=parent,
                kind=SpanKind.SERVER,
                attributes=attributes,
                record_exception=False,
                set_status_on_exception=False,
            ) as span:
                trace_id_var.set(format(span.get_span_context().trace_id, "032x"))
                code = Code.OK
                try:
                    return await handler(request, call)
                except BaseException as exc:
                    code = outcome_of(exc)
                    raise
                finally:
                    if span.is_recording():
                        span.set_attribute("rpc.grpc.status_code", int(code))
                        if code is not Code.OK:
                            span.set_status(Status(StatusCode.ERROR, code.name))

        return handle
