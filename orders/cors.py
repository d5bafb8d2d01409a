"""CORS for the checkout frontend (ORDERS_CORS_ORIGINS): Starlette's middleware, except
that a refused preflight answers application/problem+json like every other error."""

from __future__ import annotations

from starlette.datastructures import Headers
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import Response

from orders.api.problems import problem, problem_response


class ProblemCORSMiddleware(CORSMiddleware):
    def preflight_response(self, request_headers: Headers) -> Response:
        response = super().preflight_response(request_headers)
        if response.status_code < 400:
            return response
        # detail: Starlette's text, e.g. "Disallowed CORS origin, headers"
        body = problem(response.status_code, "bad-request", "Bad request", bytes(response.body).decode())
        headers = {k: v for k, v in response.headers.items() if k not in ("content-type", "content-length")}
        return problem_response(response.status_code, body, headers)
