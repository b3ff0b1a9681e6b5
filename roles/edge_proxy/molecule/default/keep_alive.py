"""Check how long the edge proxy keeps an idle client connection open for its next request.

Usage: keep_alive.py URL CA_FILE REUSED_AFTER CLOSED_AFTER, with the bearer token in EDGE_PROXY_TOKEN (never on
the command line). Two connections each send a request; after REUSED_AFTER idle seconds the first must answer a
second request, after CLOSED_AFTER idle seconds the second must have been closed by the proxy. Prints what each
connection did as JSON; exits 1 when either did otherwise.
"""

import http.client
import json
import os
import ssl
import sys
import time
import urllib.parse


def ask(connection, path, token):
    connection.request("GET", path, headers={"Authorization": "Bearer " + token})
    response = connection.getresponse()
    response.read()
    return response.status


def ask_again(connection, path, token):
    try:
        return f"answered {ask(connection, path, token)}"
    except (OSError, http.client.HTTPException) as error:
        return f"closed ({type(error).__name__})"


def main():
    url, ca_file, reused_after, closed_after = sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4])
    token = os.environ["EDGE_PROXY_TOKEN"]
    parts = urllib.parse.urlsplit(url)
    context = ssl.create_default_context(cafile=ca_file)
    reused = http.client.HTTPSConnection(parts.hostname, parts.port, timeout=10, context=context)
    closed = http.client.HTTPSConnection(parts.hostname, parts.port, timeout=10, context=context)
    for connection in (reused, closed):
        status = ask(connection, parts.path, token)
        if status != 200:
            sys.exit(f"the first request got HTTP {status}, not 200")
    started = time.monotonic()
    time.sleep(reused_after)
    after_short_idle = ask_again(reused, parts.path, token)
    time.sleep(max(0.0, closed_after - (time.monotonic() - started)))
    after_long_idle = ask_again(closed, parts.path, token)
    result = {f"idle {reused_after:g}s": after_short_idle, f"idle {closed_after:g}s": after_long_idle}
    print(json.dumps(result))
    if after_short_idle != "answered 200" or not after_long_idle.startswith("closed"):
        sys.exit(1)


if __name__ == "__main__":
    main()
