#!/bin/sh
# Entrypoint of the clipsearch images: runs the command it is given, after two checks when that command is
# `clipsearch serve` (any other command, such as `clipsearch index /photos`, runs as it is):
#
# - In a container the server listens on 0.0.0.0, so it needs an access token. Without one it stops here with a
#   message in Docker's terms (the server itself refuses too, but only after a first index that may take hours).
# - `serve --watch` watches the folders the library already has. On a first start (a new library volume) the
#   photos folder is indexed first, so the default command works with nothing but the mounts; later starts serve
#   at once, and the watcher catches up with what changed meanwhile while the server runs.
set -eu

photos=${PHOTOS_MOUNT:-/photos}  # where the image expects the photos (tests move it)
port=${CLIPSEARCH_PORT:-8000}

has_arg() {  # has_arg PATTERN ARG...: whether one of the arguments matches the shell pattern
    pattern=$1
    shift
    for arg in "$@"; do
        # shellcheck disable=SC2254  # PATTERN is a pattern on purpose
        case $arg in $pattern) return 0 ;; esac
    done
    return 1
}

# The server's own exposure check, on the settings from the environment and config file: exit 3 when refused.
# A bad setting (or any other failure) passes here: the command itself reports it, with its hint.
EXPOSURE_CHECK='
from clipsearch.config import load_settings
from clipsearch.errors import ClipsearchError
from clipsearch.webui.security import check_exposure
try:
    settings = load_settings()
except ClipsearchError:
    raise SystemExit(0)
try:
    check_exposure(settings)
except ClipsearchError:
    raise SystemExit(3)
'

require_token() {
    # Security flags on the command line are the server's to judge.
    for flag in '--access-token*' '--insecure' '--host*' '--config*'; do
        if has_arg "$flag" "$@"; then return 0; fi
    done
    refused=0
    python -c "$EXPOSURE_CHECK" || refused=$?
    if [ "$refused" -ne 3 ]; then return 0; fi
    cat >&2 <<EOF
clipsearch: no access token is set, and the server would show your photos to anyone who can reach port $port.
  Set one: it is the password of the web UI's log-in page and the API's Bearer token:
    docker run -e CLIPSEARCH_ACCESS_TOKEN="\$(openssl rand -hex 16)" ...
    CLIPSEARCH_ACCESS_TOKEN=... docker compose -f docker/compose.yaml up -d
  Or, on a network you trust, serve without one: -e CLIPSEARCH_INSECURE=true
EOF
    exit 2
}

library_folders() {  # prints how many folders the library has; fails as `clipsearch status` does (it says why)
    report=$(clipsearch status --json --failures 1) || return $?
    printf '%s' "$report" | python -c 'import json, sys; print(len(json.load(sys.stdin)["roots"]))'
}

index_photos_first() {
    if [ ! -d "$photos" ]; then
        cat >&2 <<EOF
clipsearch: the library has no photo folders yet and nothing is mounted at $photos.
  Mount your photos there, read-only:  docker run -v ~/Pictures:$photos:ro ...
EOF
        exit 2
    fi
    echo "clipsearch: a new library: indexing $photos before serving (later starts serve at once)" >&2
    # In the background, so that `docker stop` (SIGTERM to this shell, PID 1) reaches the indexer; an
    # interrupted index loses nothing and resumes on the next start.
    clipsearch index "$photos" &
    child=$!
    trap 'kill -TERM "$child" 2>/dev/null || true; wait "$child" || true; exit 143' TERM INT
    wait "$child"
    trap - TERM INT
}

if [ "${1:-}" = clipsearch ] && [ "${2:-}" = serve ]; then
    require_token "$@"
    if has_arg --watch "$@"; then
        folders=$(library_folders) || exit $?
        if [ "$folders" = 0 ]; then index_photos_first; fi
    fi
fi
exec "$@"
