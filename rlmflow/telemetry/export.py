"""OpenTelemetry export for applications (the ``rlmflow`` command), from the standard environment.

The library itself never configures providers; an application that wants rlmflow's spans and
metrics exported can call :func:`export_from_environment` and pass the providers it returns to
:class:`rlmflow.RLM`. What is read, as the OpenTelemetry SDK specifies it:

- ``OTEL_TRACES_EXPORTER`` / ``OTEL_METRICS_EXPORTER``: ``otlp``, ``console`` or ``none``
  (comma-separated). Unset, a signal is exported over OTLP only when an endpoint for it is set:
  traces with ``OTEL_EXPORTER_OTLP_ENDPOINT`` or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``, metrics
  with ``OTEL_EXPORTER_OTLP_ENDPOINT`` or ``OTEL_EXPORTER_OTLP_METRICS_ENDPOINT``. So a traces-only
  endpoint (Phoenix takes no metrics) sends no metrics anywhere.
- ``OTEL_EXPORTER_OTLP_[TRACES_|METRICS_]PROTOCOL``: ``http/protobuf`` (default) or ``grpc`` (needs
  ``opentelemetry-exporter-otlp-proto-grpc``). Endpoints, headers, timeouts, compression and
  certificates are read by the OTLP exporters themselves.
- ``OTEL_SERVICE_NAME`` and ``OTEL_RESOURCE_ATTRIBUTES``; ``service.name`` defaults to ``rlmflow``,
  and ``openinference.project.name`` (the Phoenix project) to ``PHOENIX_PROJECT_NAME`` or else the
  service name.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import SERVICE_NAME, OTELResourceDetector, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter

from . import attributes as attr

__all__ = ["Export", "ExportConfigurationError", "export_from_environment", "resource_from_environment"]

DEFAULT_SERVICE_NAME = "rlmflow"


class ExportConfigurationError(Exception):
    """The environment asks for an export this installation cannot do (a missing exporter package)."""


@dataclass
class Export:
    """The providers to hand to :class:`rlmflow.RLM` (``None``: that signal is not exported)."""

    tracer_provider: TracerProvider | None = None
    meter_provider: MeterProvider | None = None
    resource: Resource | None = None
    exporters: dict[str, list[str]] = field(default_factory=dict)  # signal -> exporter names, for messages

    def shutdown(self) -> None:
        """Flush and stop both providers, side by side (blocking: call it off the event loop).

        An unreachable collector makes each exporter retry until its timeout
        (``OTEL_EXPORTER_OTLP_TIMEOUT``, 10 s): in parallel the two waits overlap.
        """
        providers: list[Any] = [p for p in (self.tracer_provider, self.meter_provider) if p is not None]
        threads = [threading.Thread(target=p.shutdown, name="rlmflow-otel-shutdown") for p in providers[1:]]
        for thread in threads:
            thread.start()
        if providers:
            providers[0].shutdown()
        for thread in threads:
            thread.join()


def _names(env: Mapping[str, str], variable: str) -> list[str] | None:
    raw = env.get(variable, "").strip()
    if not raw:
        return None
    return [name.strip().lower() for name in raw.split(",") if name.strip()]


def _protocol(env: Mapping[str, str], signal: str) -> str:
    return (env.get(f"OTEL_EXPORTER_OTLP_{signal}_PROTOCOL") or env.get("OTEL_EXPORTER_OTLP_PROTOCOL")
            or "http/protobuf").strip().lower()


def _chosen(env: Mapping[str, str], signal: str) -> list[str]:
    """The exporters of ``signal`` ("TRACES" or "METRICS"): explicit names, or otlp if an endpoint is set."""
    names = _names(env, f"OTEL_{signal}_EXPORTER")
    if names is None:
        endpoint = env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get(f"OTEL_EXPORTER_OTLP_{signal}_ENDPOINT")
        return ["otlp"] if endpoint else []
    if "none" in names:
        return []
    return names


def _missing(package: str, signal: str) -> ExportConfigurationError:
    return ExportConfigurationError(
        f"the environment asks for {signal} export over OTLP but {package} is not installed: "
        f"pip install 'rlmflow[cli]' (or pip install {package})"
    )


def _span_exporter(name: str, protocol: str) -> SpanExporter:
    if name == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter(out=sys.stderr)  # stdout carries the answer
    if name != "otlp":
        raise ExportConfigurationError(f"OTEL_TRACES_EXPORTER={name!r} is not supported (otlp, console, none)")
    if protocol == "grpc":
        try:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (  # type: ignore[import-not-found,unused-ignore]
                OTLPSpanExporter as GrpcSpanExporter,
            )
        except ImportError:
            raise _missing("opentelemetry-exporter-otlp-proto-grpc", "trace") from None
        exporter: SpanExporter = GrpcSpanExporter()
        return exporter
    if protocol != "http/protobuf":
        raise ExportConfigurationError(f"OTLP protocol {protocol!r} is not supported (http/protobuf, grpc)")
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    except ImportError:
        raise _missing("opentelemetry-exporter-otlp-proto-http", "trace") from None
    return OTLPSpanExporter()


def _metric_reader(name: str, protocol: str) -> MetricReader:
    exporter: Any
    if name == "console":
        from opentelemetry.sdk.metrics.export import ConsoleMetricExporter

        exporter = ConsoleMetricExporter(out=sys.stderr)
    elif name != "otlp":
        raise ExportConfigurationError(f"OTEL_METRICS_EXPORTER={name!r} is not supported (otlp, console, none)")
    elif protocol == "grpc":
        try:
            from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import (  # type: ignore[import-not-found,unused-ignore]
                OTLPMetricExporter as GrpcMetricExporter,
            )
        except ImportError:
            raise _missing("opentelemetry-exporter-otlp-proto-grpc", "metric") from None
        exporter = GrpcMetricExporter()
    elif protocol != "http/protobuf":
        raise ExportConfigurationError(f"OTLP protocol {protocol!r} is not supported (http/protobuf, grpc)")
    else:
        try:
            from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
        except ImportError:
            raise _missing("opentelemetry-exporter-otlp-proto-http", "metric") from None
        exporter = OTLPMetricExporter()
    return PeriodicExportingMetricReader(exporter)  # OTEL_METRIC_EXPORT_INTERVAL is read by the reader


def resource_from_environment() -> Resource:
    """The resource: rlmflow's defaults, overridden by ``OTEL_RESOURCE_ATTRIBUTES`` / ``OTEL_SERVICE_NAME``."""
    env = os.environ
    detected = OTELResourceDetector().detect()  # reads os.environ: the variables the SDK documents
    service = str(detected.attributes.get(SERVICE_NAME) or DEFAULT_SERVICE_NAME)
    project = env.get("PHOENIX_PROJECT_NAME") or service
    defaults = Resource.create({SERVICE_NAME: DEFAULT_SERVICE_NAME, attr.OI_PROJECT_NAME: project})
    return defaults.merge(detected)  # what the environment says wins


def export_from_environment() -> Export:
    """Providers for the exports the standard OpenTelemetry environment asks for.

    Returns an :class:`Export` whose providers are ``None`` for signals that go nowhere (no
    processor, no reader, no thread). Raises :class:`ExportConfigurationError` when an exporter is
    asked for that is not installed or not known. Nothing global is set. Everything is read from
    ``os.environ``, as the exporters themselves read it.
    """
    env = os.environ
    traces, metrics_ = _chosen(env, "TRACES"), _chosen(env, "METRICS")
    export = Export(exporters={"traces": traces, "metrics": metrics_})
    if not traces and not metrics_:
        return export
    span_exporters = [_span_exporter(name, _protocol(env, "TRACES")) for name in traces]
    readers = [_metric_reader(name, _protocol(env, "METRICS")) for name in metrics_]
    export.resource = resource_from_environment()
    if span_exporters:
        export.tracer_provider = TracerProvider(resource=export.resource)
        for exporter in span_exporters:
            export.tracer_provider.add_span_processor(BatchSpanProcessor(exporter))
    if readers:
        export.meter_provider = MeterProvider(resource=export.resource, metric_readers=readers)
    return export
