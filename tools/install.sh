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

# each value of pip's setting (its PIP_* variable, else pip.conf's global.KEY) as FLAG VALUE for uv
pip_setting() {  # FLAG VARIABLE KEY
    local value
    for value in ${!2:-$("$python" -m pip config get "global.$3" 2>/dev/null || true)}; do
        args+=("$1" "$value")
    done
}

uv_install() {
    [ -x "$venv/bin/uv" ] || "$python" -m pip install -q uv >/dev/null 2>&1 || return 1
    args=(--python "$python" --index-strategy unsafe-best-match)
    pip_setting --default-index PIP_INDEX_URL index-url
    pip_setting --extra-index-url PIP_EXTRA_INDEX_URL extra-index-url
    pip_setting --find-links PIP_FIND_LINKS find-links
    pip_setting --constraint PIP_CONSTRAINT constraint
    "$venv/bin/uv" pip install -q "${args[@]}" "$@"
}

uv_install "$@" || "$python" -m pip install -q "$@"
