"""`zturbo serve` with the web UI mounted, for the e2e tests, until the server mounts it itself.

Stop-gap while the server branch lacks the one-line mount: it wraps `server.create_app` to call
`zturbo.ui.mount` exactly as the server should, then runs the real CLI (same argv as `zturbo`).
Once `create_app` mounts `/ui`, this adds nothing and the tests can call `zturbo serve` directly.
"""

from __future__ import annotations

import sys

from zturbo import cli, server, ui


def _arg(name: str, default: str) -> str:
    return sys.argv[sys.argv.index(name) + 1] if name in sys.argv else default


def main() -> int:
    create_app = server.create_app

    def create_app_with_ui(settings: server.ServeSettings):  # type: ignore[no-untyped-def]
        app = create_app(settings)
        if not any(getattr(route, "path", "").startswith("/ui") for route in app.routes):
            ui.mount(app, ui.api_base_for(_arg("--host", "127.0.0.1"), int(_arg("--port", "7860"))))
        return app

    server.create_app = create_app_with_ui
    return cli.main()


if __name__ == "__main__":
    sys.exit(main())
