#!/bin/bash
# Install the keepgpu Slurm scripts on a node (as root):
#
#   contrib/slurm/install.sh [--prefix DIR] [--bin DIR] [--force-conf]
#
# --prefix  where the scripts go (default /etc/slurm/keepgpu); must be readable by every user
#           (the TaskProlog and keepgpu-job run as the job user)
# --bin     folder holding keepgpu-supervise and keepgpu-ctl (default: found on PATH); written
#           into keepgpu-slurm.conf, since the Prolog and Epilog run with no PATH
# --force-conf  overwrite an existing keepgpu-slurm.conf (default: keep the admin's edits);
#           site settings in keepgpu-slurm.local.conf next to it are never touched
#
# Then add the slurm.conf lines it prints (docs/slurm.md explains each).
set -euo pipefail

prefix=/etc/slurm/keepgpu
bin=""
force=0
while (($#)); do
    case $1 in
    --prefix) prefix=$2; shift 2 ;;
    --bin) bin=$2; shift 2 ;;
    --force-conf) force=1; shift ;;
    -h | --help) sed -n '2,15s/^# \{0,1\}//p' "$0"; exit 0 ;;
    *) echo "install.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done

die() { echo "install.sh: error: $*" >&2; exit 1; }

((EUID == 0)) || die "run as root: the Prolog and Epilog scripts must be root's"
[[ $prefix == /* ]] || die "--prefix must be absolute: $prefix"
if [[ -z $bin ]]; then
    found=$(command -v keepgpu-ctl) || die "keepgpu-ctl is not on PATH; give --bin DIR"
    bin=$(dirname -- "$(readlink -f -- "$found")")
    # A venv's bin/ holds symlinks to the interpreter: keep the folder the script was found in.
    [[ -x $bin/keepgpu-supervise ]] || bin=$(dirname -- "$found")
fi
[[ $bin == /* ]] || die "--bin must be absolute: $bin"
for tool in keepgpu-supervise keepgpu-ctl; do
    [[ -x $bin/$tool ]] || die "$bin/$tool is missing or not executable"
done
version=$("$bin/keepgpu-ctl" --version) || die "$bin/keepgpu-ctl --version failed"

src=$(dirname -- "$(readlink -f -- "$0")")
put() {
    # put MODE FILE: copy next to the target, then rename over it: slurmd may run the old one
    # at this very moment, and must never find it missing or half written.
    install -m "$1" -o root -g root "$src/$2" "$prefix/.$2.new"
    mv -f "$prefix/.$2.new" "$prefix/$2"
}

install -d -m 0755 -o root -g root "$prefix"
put 0644 keepgpu-slurm-lib.sh
put 0644 keepgpu-job-nodes.sh
for script in keepgpu-prolog keepgpu-epilog keepgpu-task-prolog keepgpu-task-epilog keepgpu-job; do
    put 0755 "$script"
done
conf=$prefix/keepgpu-slurm.conf
if [[ ! -e $conf || $force == 1 ]]; then
    sed "s|@KEEPGPU_BIN@|$bin|" "$src/keepgpu-slurm.conf" >"$conf.tmp"
    chown root:root "$conf.tmp"
    chmod 0644 "$conf.tmp"
    mv -f "$conf.tmp" "$conf"
    echo "wrote $conf (KEEPGPU_BIN=$bin)"
else
    echo "kept $conf; check that KEEPGPU_BIN there is $bin"
fi
echo "installed the keepgpu Slurm scripts into $prefix ($version)"
cat <<CONF
Add to slurm.conf (then: scontrol reconfigure):
  Epilog=$prefix/keepgpu-epilog
  TaskProlog=$prefix/keepgpu-task-prolog
  TaskEpilog=$prefix/keepgpu-task-epilog
  # keep-until-the-first-step mode (KEEPGPU_PROLOG_KEEP in $conf):
  Prolog=$prefix/keepgpu-prolog
  PrologFlags=Alloc
Job scripts: $prefix/keepgpu-job start | stop
CONF
