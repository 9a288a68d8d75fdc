"""The farm over HTTP: `renderfarm api` (an ASGI app, FastAPI on uvicorn), stateless over the farm's Redis so
that several can run behind a load balancer.

    renderfarm api [--host 127.0.0.1] [--port 8000] [--redis URL]

Every request goes through the same FarmClient as the Python client and the CLI (one path for a job however
it arrives: the same validation, all or nothing, the same team rules):

- native endpoints under /v1 (renderfarm/api/native.py): submit a batch, job and batch status with position and
  ETA, cancel, results (PNG with its infotext, or JSON with base64), the model/LoRA/node inventory, and a
  Server-Sent Events stream of state changes (renderfarm/api/sse.py);
- AUTOMATIC1111's /sdapi/v1 as far as it maps (renderfarm/api/a1111.py): txt2img through the farm, models,
  LoRAs, progress, options; a field the farm cannot honour is a 422 naming it, never silently ignored;
- /metrics for Prometheus (renderfarm/metrics.py), /v1/health, and the OpenAPI docs at /docs.

Team tokens (cluster/auth.py) are bearer tokens (`Authorization: Bearer rft_...`), or the password of HTTP
Basic auth (what A1111 clients send with --api-auth; the user name is not checked). A team token sees and
cancels its own team's jobs only; an admin token sees all. Listening anywhere but loopback needs the farm to be
in token mode (`renderfarm token create`), as a Redis off loopback needs a password: otherwise anyone who
reaches the port could read every prompt and image.
"""

from renderfarm.api.app import ApiContext, create_app

__all__ = ["ApiContext", "create_app"]
