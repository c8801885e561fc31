"""/docs: Swagger UI over /openapi.json, from the assets flask-openapi3-swagger ships (no CDN, works
offline), with a Content-Security-Policy that lets the page load nothing but its own files."""

from __future__ import annotations

from importlib.resources import files

from flask import Blueprint, Flask, Response

ASSETS = str(files("flask_openapi3_swagger").joinpath("templates", "swagger"))
# Only this origin: the page, its script and style, /openapi.json and the "Try it out" requests. Swagger
# UI draws its icons as data: images; no inline script or style is needed (the page start is in init.js).
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)

# Relative links: the page keeps working behind a proxy that serves catalog under a path prefix.
PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>catalog API</title>
<link rel="icon" href="docs/assets/images/swagger.svg">
<link rel="stylesheet" href="docs/assets/css/swagger-ui.css">
</head>
<body>
<div id="swagger-ui"></div>
<script src="docs/assets/js/swagger-ui-bundle.js"></script>
<script src="docs/init.js"></script>
</body>
</html>
"""

# No top bar (it would load any document a link names), no call to the public validator, the API key
# forgotten with the page.
INIT_SCRIPT = """window.addEventListener("load", function () {
  window.ui = SwaggerUIBundle({
    url: "openapi.json",
    dom_id: "#swagger-ui",
    layout: "BaseLayout",
    deepLinking: true,
    validatorUrl: null,
    persistAuthorization: false,
    displayRequestDuration: true,
  });
});
"""

docs = Blueprint("docs", __name__, static_folder=ASSETS, static_url_path="/docs/assets")


@docs.after_request
def content_security_policy(response: Response) -> Response:
    """The page and its files may load nothing from anywhere else."""
    response.headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
    response.headers["X-Content-Type-Options"] = "nosniff"
    return response


@docs.get("/docs")
def page() -> Response:
    """The Swagger UI page."""
    return Response(PAGE, mimetype="text/html")


@docs.get("/docs/init.js")
def init_script() -> Response:
    """Starts Swagger UI on /openapi.json (a file, not an inline script, for the policy's sake)."""
    return Response(INIT_SCRIPT, mimetype="text/javascript")


def init_app(app: Flask) -> None:
    """Serve /docs and its assets."""
    app.register_blueprint(docs)
