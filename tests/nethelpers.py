"""HTTP probes shared by the tests that start real servers (MLflow with basic auth, Ray dashboards)."""

from __future__ import annotations

import urllib.error
import urllib.request


def http_status(url: str, headers: dict[str, str] | None = None, timeout: float = 5.0) -> int:
    """The status code of GET `url` (an HTTP error's code too); 0 when nothing answers."""
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            return resp.status
    except urllib.error.HTTPError as err:
        return err.code
    except OSError:
        return 0
