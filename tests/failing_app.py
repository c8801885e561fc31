"""catalog's app plus one route that raises, for the tests of what an unhandled exception does:
`gunicorn -c gunicorn.conf.py --pythonpath <repo> 'tests.failing_app:create_app()'`."""

from typing import Any

from catalog import create_app as create_catalog_app

FAILING_PATH = "/test/unhandled-error"


class ForcedFailure(RuntimeError):
    """Raised by the failing route: a bug the service has no answer for."""


def create_app() -> Any:
    """catalog as gunicorn builds it, with a route whose view raises."""
    app = create_catalog_app()

    def fail() -> None:
        raise ForcedFailure("forced by the test")

    app.add_url_rule(FAILING_PATH, "test_failure", fail)
    return app
