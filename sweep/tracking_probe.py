"""One request of MLflow's REST API to a given tracking server, as the sweep's MLflow client will make it.

`GET /health` answers 200 from any web server on that port, and from an MLflow server whose API refuses
the credentials this process has. Either way a sweep then trained for its whole length unrecorded and
ended with exit 3 ("not in MLflow yet"), for what is a mistake in the URL or the environment. So before
anything starts, `check_api` asks the API itself (one experiment search, no retries) with the credentials
MLflow's client sends (MLFLOW_TRACKING_USERNAME / _PASSWORD, MLFLOW_TRACKING_TOKEN, ~/.mlflow/credentials,
TLS settings: MLflow's own `get_default_host_creds`), and a refusal is one UserError naming what to fix.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from typing import TYPE_CHECKING

from sweep.errors import Problem, UserError

if TYPE_CHECKING:
    import requests

    from sweep.config import SweepSpec

API_PROBE_TIMEOUT_S = 15.0  # as fwsweep's MLflow client waits for a request (mlflow_runs/writer.py)
PROBE_ENDPOINT = "/api/2.0/mlflow/experiments/search"
CREDENTIAL_VARIABLES = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")
LOGIN = "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD, or MLFLOW_TRACKING_TOKEN"
TLS_FIX = ("set MLFLOW_TRACKING_SERVER_CERT_PATH to the CA certificate (PEM) that signed the server's, as "
           "MLflow's client reads it (or MLFLOW_TRACKING_INSECURE_TLS=true to skip the check)")
NOT_MLFLOW_FIX = ("give the MLflow tracking server's address, with its path if it is served under one "
                  "(http://HOST:PORT/PATH), or unset --tracking-uri / MLFLOW_TRACKING_URI so fwsweep starts "
                  "its own local server")


def get(uri: str, endpoint: str, timeout: float, **params: object) -> requests.Response:
    """GET `endpoint` of the server at `uri` once (no retries), as MLflow's client would: its credentials
    and TLS settings (MLFLOW_TRACKING_SERVER_CERT_PATH for a private CA, MLFLOW_TRACKING_INSECURE_TLS)."""
    import requests
    from mlflow.exceptions import MlflowException
    from mlflow.tracking._tracking_service.utils import get_default_host_creds
    from mlflow.utils.rest_utils import http_request
    from urllib3.exceptions import InsecureRequestWarning

    from sweep.errors import in_chain

    try:
        with warnings.catch_warnings():  # asked for with MLFLOW_TRACKING_INSECURE_TLS: not news per request
            warnings.simplefilter("ignore", InsecureRequestWarning)
            return http_request(get_default_host_creds(uri), endpoint, "GET", max_retries=0, backoff_factor=0,
                                timeout=timeout, raise_on_status=False, params=params or None)
    except MlflowException as err:  # MLflow wraps what `requests` raised: callers get that back
        failed = in_chain(err, lambda e: isinstance(e, requests.exceptions.RequestException))
        if failed is None:
            raise
        raise failed from None


def check_server(uri: str, setting: str, shown: str, health_timeout: float) -> None:
    """A UserError naming `setting` unless a server answers `/health` at `uri` and MLflow's API there answers
    a search with JSON; `shown` is the URI as messages may print it (password redacted)."""
    import requests

    try:
        get(uri, "/health", health_timeout)
        where = f"GET {shown.rstrip('/')}{PROBE_ENDPOINT}"
        response = get(uri, PROBE_ENDPOINT, API_PROBE_TIMEOUT_S, max_results=1)
    except requests.exceptions.SSLError as err:
        raise UserError(Problem(setting, f"the TLS certificate of {shown} is not trusted here "
                                f"({_reason(err)})", TLS_FIX)) from None
    except requests.exceptions.RequestException:
        raise UserError(Problem(
            setting, f"no MLflow server answers at {shown} (GET {shown.rstrip('/')}/health failed; also "
            "checked: --tracking-uri / MLFLOW_TRACKING_URI)",
            "start it (e.g. `mlflow server --host 127.0.0.1 --port 5000`), correct the URL, or unset "
            "--tracking-uri / MLFLOW_TRACKING_URI so fwsweep starts its own local server")) from None
    status = response.status_code
    if status == 401:
        raise UserError(_refused_login(shown, where))
    if status == 403:
        raise UserError(Problem(setting, f"MLflow at {shown} refuses this user ({where}: HTTP 403)",
                                f"ask the server's admin for access, or set {LOGIN} for a user that has it"))
    if status == 200 and _is_json_object(response.text):
        return
    kind = response.headers.get("Content-Type", "no content type").split(";")[0]
    if status >= 500:
        raise UserError(Problem(setting, f"MLflow at {shown} fails requests ({where}: HTTP {status}: "
                                f"{_server_says(response.text)})",
                                "check the server's log and its database, then run the command again"))
    raise UserError(Problem(setting, f"the server at {shown} is not an MLflow tracking server "
                            f"({where}: HTTP {status}, {kind})", NOT_MLFLOW_FIX))


def _reason(err: BaseException) -> str:
    """The words of a TLS failure that say why ("certificate verify failed: self-signed certificate")."""
    text = str(err)
    found = re.search(r"certificate verify failed: ([^(\]\"']+)", text)
    return found.group(0).strip() if found else (text.splitlines() or [type(err).__name__])[0][:200]


def _refused_login(shown: str, where: str) -> Problem:
    given = [name for name in CREDENTIAL_VARIABLES if os.environ.get(name)]
    if given:
        return Problem(" / ".join(given), f"MLflow at {shown} does not accept these credentials ({where}: "
                       "HTTP 401)", "correct them (a user of that server and its password, or a valid token)")
    return Problem("MLFLOW_TRACKING_USERNAME", f"MLflow at {shown} asks for a login and none is set "
                   f"({where}: HTTP 401)", f"export {LOGIN} in the environment, or put them in "
                   "~/.mlflow/credentials; not on the command line")


def _is_json_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except ValueError:
        return False


def _server_says(text: str) -> str:
    """The message of MLflow's JSON error body, else the first line of whatever came back."""
    try:
        body = json.loads(text)
    except ValueError:
        body = None
    if isinstance(body, dict) and isinstance(body.get("message"), str):
        text = body["message"]
    return next((line.strip() for line in text.splitlines() if line.strip()), "no body")[:200]


class TrackingRefused(UserError):
    """MLflow refused the sweep's writes for who made them (HTTP 401/403) once the sweep ran: a read-only
    user, an experiment of someone else's, credentials revoked. Nothing more would be recorded, so the
    sweep stops (exit 2) as on a storage fault: Tune's state is kept and `sweep resume` goes on."""

    def __init__(self, url: str, spec: SweepSpec, why: str) -> None:
        super().__init__(Problem(
            "MLflow", f"{url} refuses this sweep's writes ({why}), so none of its results would be "
            f"recorded; the sweep stopped",
            f"log as a user who may write to experiment {spec.experiment!r} ({LOGIN}; its owner or the "
            f"server's admin grants EDIT), then `sweep resume {spec.name}`: finished trials are kept and the "
            "rest go on"))


UNANSWERED_EXIT = 3  # as a sweep whose results MLflow lacks: what the command wrote is kept, run it again


def failed_request(err: BaseException) -> tuple[int, Problem] | None:
    """(exit code, problem) when `err` (or one it wraps) is an MLflow request refused for who made it (exit
    2) or one the server did not answer (exit 3): a command between the check of its tracking server and
    its end meets those as the server's doing, not a bug of ours. None for anything else."""
    import requests
    from mlflow.exceptions import MlflowException

    from sweep.errors import in_chain
    from sweep.mlflow_runs.writer import is_transient, refusal_status, said

    refused = in_chain(err, lambda e: refusal_status(e) is not None)
    if refused is not None:
        return 2, Problem("MLflow", f"the tracking server refused a request (HTTP {refusal_status(refused)}: "
                          f"{said(refused)})", f"log as a user who may write there ({LOGIN}), then run the "
                          "command again")
    down = in_chain(err, lambda e: isinstance(e, MlflowException | requests.RequestException)
                    and is_transient(e))
    if down is not None:
        return UNANSWERED_EXIT, Problem(
            "MLflow", f"the tracking server stopped answering ({said(down)})",
            "what this command finished is kept; once the server answers, run it again (for a sweep, "
            "`sweep sync NAME` completes its runs)")
    return None
