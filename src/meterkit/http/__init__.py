"""meterkit's HTTP surfaces, independent of any web framework.

:class:`HttpApp` answers a :class:`Request` with a :class:`Response`; the ASGI and Flask
adapters only translate to and from these.
"""

from meterkit.http.app import HttpApp
from meterkit.http.core import Request, Response, json_response, ndjson_response

__all__ = ["HttpApp", "Request", "Response", "json_response", "ndjson_response"]
