"""cnnstudy-ui: start the MLflow dashboard on 127.0.0.1 and print the link to the runs table.

MLflow 3's UI opens on its GenAI overview; the link printed here goes straight to
the experiment's runs table, where runs are compared side by side.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from urllib.parse import quote, urlencode

from cnnstudy.config.compose import compose
from cnnstudy.errors import ConfigError, console_script, user_errors_exit
from cnnstudy.log import get as get_log
from cnnstudy.run import store

DEFAULT_ADDRESS = "http://127.0.0.1:5000"


def _address_file(uri: str) -> Path | None:
    """Where cnnstudy-ui notes the address it serves a SQLite store at: beside the file."""
    path = store.sqlite_path(uri)
    return None if path is None else path.with_name(path.name + ".ui.json")


def address(uri: str) -> tuple[str, bool]:
    """(the dashboard's address for the runs in `uri`, whether it is serving now): the
    server itself for an http store; else where cnnstudy-ui serves this store, when it
    does; else the address `cnnstudy-ui` would take."""
    if uri.startswith(("http://", "https://")):
        return uri.rstrip("/"), True
    noted = _address_file(uri)
    try:
        served = json.loads(noted.read_text()) if noted else None
        os.kill(int(served["pid"]), 0)
        return str(served["url"]), True
    except (OSError, ValueError, KeyError, TypeError):
        return DEFAULT_ADDRESS, False


def run_link(uri: str, experiment_id: str, run_id: str) -> str:
    return f"{address(uri)[0]}/#/experiments/{experiment_id}/runs/{run_id}"


def runs_link(uri: str, experiment_id: str, search: str, order_by: str, ascending: bool) -> str:
    """The experiment's runs table, filtered (MLflow's search syntax) and sorted, e.g. on
    metrics.`val/acc`."""
    query = urlencode(
        {"searchFilter": search, "orderByKey": order_by, "orderByAsc": str(ascending).lower()},
        quote_via=quote,
    )
    return f"{address(uri)[0]}/#/experiments/{experiment_id}/runs?{query}"


def served_note(uri: str) -> str:
    return "" if address(uri)[1] else "  (start the dashboard: cnnstudy-ui)"


def _port_free(host: str, port: int) -> None:
    import socket

    with socket.socket() as probe:
        try:
            probe.bind((host, port))
        except OSError as err:
            raise ConfigError(
                f"--port {port}: cannot listen on {host}:{port} ({err.strerror}); another "
                "program (an MLflow UI already running?) holds it. Give another: --port 5001"
            ) from None


@user_errors_exit
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="cnnstudy-ui", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    parser.add_argument(
        "--port", type=int, default=None, help="port (default: 5000; 8080 --optuna)"
    )
    parser.add_argument("--print-only", action="store_true", help="print the link, start nothing")
    parser.add_argument(
        "--optuna",
        action="store_true",
        help="serve optuna-dashboard on the study storage (trial states, timeline, "
        "intermediate values, importances) instead of the MLflow UI; default port 8080",
    )
    parser.add_argument(
        "--storage",
        default="sqlite:///optuna.db",
        help="with --optuna: the Optuna storage (default: sqlite:///optuna.db)",
    )
    parser.add_argument(
        "overrides", nargs="*", help="Hydra overrides, e.g. logger.experiment_name=x"
    )
    args = parser.parse_args(argv)
    if args.optuna:
        _optuna_dashboard(args)
        return
    args.port = args.port or 5000

    cfg = compose(args.overrides)
    uri = store.tracking_uri(cfg)
    if not uri.startswith(("sqlite:", "postgresql", "mysql", "mssql")):
        raise ConfigError(
            f"tracking URI {uri}: cnnstudy-ui serves a database store; "
            "for an MLflow server, open its address instead"
        )
    store.check_store(uri, create=False)  # showing runs creates no store
    if not args.print_only:
        _port_free(args.host, args.port)

    import mlflow

    experiment = mlflow.MlflowClient(uri).get_experiment_by_name(cfg.logger.experiment_name)
    if experiment is None:
        raise ConfigError(
            f"logger.experiment_name={cfg.logger.experiment_name}: no such experiment in {uri}; "
            "train a run first (make demo)"
        )
    get_log().info(
        f"MLflow runs of '{experiment.name}': "
        f"http://{args.host}:{args.port}/#/experiments/{experiment.experiment_id}/runs"
    )
    if args.print_only:
        return
    noted = _address_file(uri)
    if noted is not None:  # the process keeps its pid through exec: studies link here
        try:
            url = f"http://{args.host}:{args.port}"
            noted.write_text(json.dumps({"url": url, "pid": os.getpid()}))
        except OSError:
            pass
    command = [
        sys.executable,
        "-m",
        "mlflow",
        "ui",
        "--backend-store-uri",
        uri,
        "--host",
        args.host,
        "--port",
        str(args.port),
    ]
    os.execv(sys.executable, command)


def _optuna_dashboard(args: argparse.Namespace) -> None:
    """optuna-dashboard on the study storage, on 127.0.0.1 unless --host says otherwise."""
    args.port = args.port or 8080
    path = store.sqlite_path(args.storage)
    if args.storage.startswith("sqlite:") and (path is None or not path.is_file()):
        raise ConfigError(
            f"--storage {args.storage}: no such file ({path}); run a study first (make demo), "
            "or give the storage your studies are in"
        )
    if not args.print_only:
        _port_free(args.host, args.port)
    print(
        f"optuna-dashboard of {args.storage}: http://{args.host}:{args.port}/dashboard", flush=True
    )
    if args.print_only:
        return
    from optuna_dashboard import run_server

    from cnnstudy.study.storage import make_storage

    run_server(make_storage(args.storage), host=args.host, port=args.port)


cli = console_script(main)

if __name__ == "__main__":
    main()
