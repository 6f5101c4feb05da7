"""outflow annotation API for a FastAPI (Starlette) app served by uvicorn.

The server knows who the client is (it checked the API key, it terminated TLS, it speaks
HTTP/2); outflow cannot read that on the wire. Tag the connection before the response starts,
and outflow attributes the response's bytes, exactly, to that client id:

    import uvicorn
    from fastapi import FastAPI
    from fastapi_outflow import OutflowH11Protocol, OutflowMiddleware

    app = FastAPI()
    app.add_middleware(OutflowMiddleware, client_id=lambda request: request.headers.get("x-tenant"))
    uvicorn.run(app, host="0.0.0.0", port=8000, http=OutflowH11Protocol)

`client_id` gets the Starlette request and returns the id (or None). Run the agent with
`--annotations` (`annotations = true` under [attribution]); ids are hashed by the agent unless it
keeps ids raw. Without the agent, the call fails quietly and serving goes on.
"""

import socket

from starlette.middleware.base import BaseHTTPMiddleware
from uvicorn.protocols.http.h11_impl import H11Protocol

SOL_OUTFLOW = 0x4F46  # private level, handled by outflow's cgroup/setsockopt program
OUTFLOW_CLIENT_ID = 1  # value: the client id, at most 256 bytes
SCOPE_KEY = "outflow.socket"


class OutflowH11Protocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol, with the connection's socket in each request's scope."""

    def connection_made(self, transport):
        super().connection_made(transport)
        sock = transport.get_extra_info("socket")
        app = self.app

        async def with_socket(scope, receive, send):
            scope.setdefault("extensions", {})[SCOPE_KEY] = sock
            return await app(scope, receive, send)

        self.app = with_socket


def annotate(sock, client_id):
    """Tags what `sock` sends from now on with `client_id`; False if it could not."""
    if sock is None or not client_id:
        return False
    try:
        sock.setsockopt(SOL_OUTFLOW, OUTFLOW_CLIENT_ID, client_id.encode()[:256])
        return True
    except OSError:  # no agent attached (ENOPROTOOPT), or not a TCP socket
        return False


class OutflowMiddleware(BaseHTTPMiddleware):
    """Annotates each request's connection with the id `client_id(request)` returns."""

    def __init__(self, app, client_id):
        super().__init__(app)
        self.client_id = client_id

    async def dispatch(self, request, call_next):
        sock = request.scope.get("extensions", {}).get(SCOPE_KEY)
        annotate(sock, self.client_id(request))
        return await call_next(request)


if __name__ == "__main__":
    # A quick check without FastAPI: annotate a fresh socket.
    s = socket.socket()
    print("annotated" if annotate(s, "tenant-42") else "not annotated (agent not attached?)")
