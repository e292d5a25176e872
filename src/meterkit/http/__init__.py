"""meterkit's HTTP surfaces, independent of any web framework."""

from meterkit.http.core import Request, Response, json_response, ndjson_response

__all__ = ["Request", "Response", "json_response", "ndjson_response"]
