#!/usr/bin/env bash
# Install packages into the virtual environment $VENV (default .venv), as `pip install ARGS...` would.
#
#     VENV=.venv tools/install.sh torch==2.14.1 torchvision==0.29.1 -e ".[test]"
#
# With uv when pip can install it: parallel downloads and unpacking (a fresh demo environment in about
# 45 s on a 2-core machine, where pip takes over 2 minutes); no bytecode unless UV_COMPILE_BYTECODE=1
# (uv compiles the whole environment, in parallel; pip always compiles what it installs).
# uv is handed the indexes, find-links and constraints pip is configured with (pip.conf and PIP_*),
# and picks across them as pip does, so both install the same releases under the same caps.
# Falls back to pip when uv cannot be installed or cannot resolve.
set -euo pipefail
venv=${VENV:-.venv}
python=$venv/bin/python

uv_install() {
    "$python" -m pip install -q uv >/dev/null 2>&1 || return 1
    local args=(--python "$python" --index-strategy unsafe-best-match)
    local url
    for url in ${PIP_INDEX_URL:-$("$python" -m pip config get global.index-url 2>/dev/null || true)}; do
        args+=(--default-index "$url")
    done
    for url in ${PIP_EXTRA_INDEX_URL:-$("$python" -m pip config get global.extra-index-url 2>/dev/null || true)}; do
        args+=(--extra-index-url "$url")
    done
    for url in ${PIP_FIND_LINKS:-$("$python" -m pip config get global.find-links 2>/dev/null || true)}; do
        args+=(--find-links "$url")
    done
    for url in ${PIP_CONSTRAINT:-$("$python" -m pip config get global.constraint 2>/dev/null || true)}; do
        args+=(--constraint "$url")
    done
    "$venv/bin/uv" pip install -q "${args[@]}" "$@"
}

uv_install "$@" || "$python" -m pip install -q "$@"
