"""The command line's structure: one app (pipelines/cli_app.py) that the command modules register onto
and the entry point (pipelines/cli.py) imports, with no import circle and no `__main__` workaround."""

from __future__ import annotations

from pathlib import Path

from tests.test_use_layer import _imports, _reachable

PIPELINES = Path(__file__).resolve().parents[1] / "pipelines"
COMMANDS = [
    "shards",
    "download",
    "embed",
    "index",
    "neighbors",
    "train",
    "evaluate",
    "demo",
    "browse",
    "doctor",
    "runs",
    "compare",
    "list",
    "serve",
    "predict",
]


def test_cli_modules_import_the_app_never_the_entry_point() -> None:
    """No CLI module reaches pipelines.cli (the entry point) through its imports, the app module reaches
    no command module, and none looks itself up in sys.modules: `python -m retformer.pipelines.cli` and the
    console script register on the one app without a second copy of a module."""
    modules = sorted(f"retformer.pipelines.{p.stem}" for p in PIPELINES.glob("cli*.py"))
    assert "retformer.pipelines.cli_app" in modules and "retformer.pipelines.cli" in modules
    for module in modules:
        if module != "retformer.pipelines.cli":
            assert "retformer.pipelines.cli" not in _reachable(module), module
        assert "sys.modules" not in (PIPELINES / f"{module.split('.')[-1]}.py").read_text(), module
    assert not {m for m in _imports("retformer.pipelines.cli_app") if m.startswith("retformer.pipelines.cli")}


def test_entry_point_registers_every_command_in_help_order() -> None:
    """Importing the entry point gives the app every command, in the order `retformer --help` lists
    them (the stages first, then the commands that use runs and look around)."""
    from retformer.pipelines import cli
    from retformer.pipelines.cli_app import app

    assert cli.app is app
    assert [c.name or c.callback.__name__ for c in app.registered_commands] == COMMANDS


def test_serve_until_stopped_closes_the_server_on_ctrl_c(capsys) -> None:
    """`serve_until_stopped` (the loop `retformer browse` and `serve` share) serves until a
    KeyboardInterrupt, then prints "stopped" on stderr and closes the server; SIGINT is left raising
    KeyboardInterrupt (also when the shell started the process with SIGINT ignored)."""
    import signal

    from retformer.pipelines.cli_app import serve_until_stopped

    class Server:
        closed = False

        def serve_forever(self) -> None:
            assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
            raise KeyboardInterrupt

        def server_close(self) -> None:
            self.closed = True

    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    server = Server()
    try:
        serve_until_stopped(server)  # type: ignore[arg-type]
    finally:
        signal.signal(signal.SIGINT, before[0])
        signal.signal(signal.SIGTERM, before[1])
    assert server.closed
    assert capsys.readouterr().err == "stopped\n"
