# Sourced by scripts/quickstart.sh and scripts/test.sh (from the checkout's root): sets PY to
# an interpreter that pip may install into.
#   $PYTHON, when set, is used as it is;
#   else python3, when pip may install into it (a venv, pyenv, conda, root on CI...);
#   else a venv in .venv of this checkout: a stock Debian/Ubuntu python3 is "externally
#   managed" (PEP 668) and refuses `pip install` outside a venv.
pick_python() {
    if [[ -n ${PYTHON:-} ]]; then
        PY=$PYTHON
        return
    fi
    if python3 - <<'PY'
import os, sys, sysconfig
managed = os.path.exists(os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED"))
sys.exit(1 if managed and sys.prefix == sys.base_prefix else 0)
PY
    then
        PY=python3
        return
    fi
    if [[ ! -x .venv/bin/python ]]; then
        echo "python3 is externally managed: creating a venv in $PWD/.venv" >&2
        python3 -m venv .venv || {
            echo "cannot create a venv: install python3-venv (apt install python3-venv)" >&2
            exit 1
        }
    fi
    PY=$PWD/.venv/bin/python
}
