#!/usr/bin/env bash
# A one-node SLURM cluster on this machine (localhost, no systemd), with accounting, for
# tests/test_slurm.py and for trying `hydra/launcher=slurm` (README, "Sweeps, SLURM and resuming").
#
#   bash scripts/slurm_local.sh up       install once (apt-get), then start munged, mariadbd, slurmdbd,
#                                         slurmctld and slurmd in that order, each waited for; idempotent
#   bash scripts/slurm_local.sh status   which daemons run, and sinfo (exit 0 when the node is usable)
#   bash scripts/slurm_local.sh down     cancel every job, stop the daemons by their PID files, remove
#                                         the generated configs and the cluster's state
#
# Needs root and Debian's packages (slurm 22.05 on bookworm).  The configs come from
# scripts/slurm/*.conf.in with this node's CPUs and memory; logs, PID files and state live in
# $SPEFT_SLURM_DIR (default /var/lib/speft-slurm).  A /etc/slurm/slurm.conf that this script did not
# write (a real cluster's) is never touched: `up` refuses.
set -euo pipefail

HERE="$(cd "$(dirname "$0")" && pwd)"
STATE="${SPEFT_SLURM_DIR:-/var/lib/speft-slurm}"
ETC=/etc/slurm
MARK="speft-bench-local-cluster"  # in every file we write; nothing without it is overwritten or removed
PACKAGES=(slurmctld slurmd slurm-client munge slurmdbd mariadb-server)
WAIT_S="${SPEFT_SLURM_WAIT_S:-30}"  # per daemon

say() { echo "slurm_local: $*"; }
die() { echo "slurm_local: $*" >&2; exit 1; }

# --- helpers ---------------------------------------------------------------------------------------

# alive PIDFILE NAME: the process in PIDFILE exists and is NAME (not a recycled PID).
alive() {
    local pid
    [[ -s "$1" ]] || return 1
    pid="$(cat "$1" 2>/dev/null)" || return 1
    [[ "$pid" =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null && [[ "$(cat "/proc/$pid/comm" 2>/dev/null)" == "$2" ]]
}

# wait_for WHAT COMMAND...: retry COMMAND every 0.2 s for up to WAIT_S seconds.
wait_for() {
    local what="$1" deadline=$((SECONDS + WAIT_S))
    shift
    until "$@" >/dev/null 2>&1; do
        ((SECONDS < deadline)) || die "$what did not come up in ${WAIT_S}s (logs: $STATE/log, /var/log/mysql)"
        sleep 0.2
    done
}

# stop PIDFILE NAME: SIGTERM, up to 20 s, then SIGKILL; removes the PID file.
stop() {
    local pid i t0=$SECONDS
    if alive "$1" "$2"; then
        pid="$(cat "$1")"
        kill -TERM "$pid" 2>/dev/null || true
        for i in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
        if kill -0 "$pid" 2>/dev/null; then kill -KILL "$pid" 2>/dev/null || true; fi
        say "stopped $2 ($pid) in $((SECONDS - t0)) s"
    fi
    rm -f "$1"
}

ours() { [[ ! -e "$1" ]] || grep -q "$MARK" "$1"; }

installed() {
    local p
    for p in "${PACKAGES[@]}"; do
        [[ "$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null)" == "install ok installed" ]] || return 1
    done
}

install_packages() {
    installed && return 0
    command -v apt-get >/dev/null || die "no apt-get: install ${PACKAGES[*]} by hand"
    local start=$SECONDS made_policy=0
    # Packages must not start their daemons (no init system here; we start them with our configs).
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d && made_policy=1
    fi
    say "installing ${PACKAGES[*]} (apt-get, --no-install-recommends)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}" >/dev/null
    if ((made_policy)); then rm -f /usr/sbin/policy-rc.d; fi
    say "installed in $((SECONDS - start)) s"
}

# render TEMPLATE DEST [MODE]: fill @STATE@ @CPUS@ @MEMORY_MB@ @MEM_PER_CPU_MB@ @DB_PASS@; returns 0 when
# DEST changed.
render() {
    local tmp
    tmp="$(mktemp)"
    sed -e "s|@STATE@|$STATE|g" -e "s|@CPUS@|$CPUS|g" -e "s|@MEMORY_MB@|$MEMORY_MB|g" \
        -e "s|@MEM_PER_CPU_MB@|$MEM_PER_CPU_MB|g" -e "s|@DB_PASS@|$DB_PASS|g" "$1" >"$tmp"
    chmod "${3:-644}" "$tmp"
    if [[ -e "$2" ]] && cmp -s "$tmp" "$2"; then rm -f "$tmp"; return 1; fi
    mv "$tmp" "$2"
    return 0
}

write_configs() {
    ours "$ETC/slurm.conf" || die "$ETC/slurm.conf exists and was not written by this script: refusing to replace it"
    ours "$ETC/slurmdbd.conf" || die "$ETC/slurmdbd.conf exists and was not written by this script"
    mkdir -p "$ETC" "$STATE"/{run,log,state,spool}
    # What slurmd itself detects, so the node never drains for "low socket*core*thread count" or memory.
    local detected
    detected="$(slurmd -C | head -1)"
    CPUS="$(sed -n 's/.*CPUs=\([0-9]*\).*/\1/p' <<<"$detected")"
    MEMORY_MB="$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$detected")"
    [[ -n "$CPUS" && -n "$MEMORY_MB" ]] || die "could not read CPUs/RealMemory from 'slurmd -C': $detected"
    MEM_PER_CPU_MB=$((MEMORY_MB / CPUS))  # a job without --mem gets its CPUs' share, not the whole node
    [[ -s "$STATE/db_pass" ]] || (umask 077; head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$STATE/db_pass")
    DB_PASS="$(cat "$STATE/db_pass")"
    CHANGED=0
    if render "$HERE/slurm/slurm.conf.in" "$ETC/slurm.conf"; then CHANGED=1; fi
    render "$HERE/slurm/slurmdbd.conf.in" "$ETC/slurmdbd.conf" 600 || true
    say "node: $CPUS CPUs, $MEMORY_MB MB ($ETC/slurm.conf)"
}

# --- daemons, in start order -----------------------------------------------------------------------

start_munge() {
    if alive /run/munge/munged.pid munged; then return 0; fi
    mkdir -p /run/munge /var/log/munge /var/lib/munge /etc/munge
    chown munge:munge /run/munge /var/log/munge /var/lib/munge
    chmod 0755 /run/munge
    if [[ ! -s /etc/munge/munge.key ]]; then
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    fi
    chown munge:munge /etc/munge/munge.key && chmod 0400 /etc/munge/munge.key
    runuser -u munge -- /usr/sbin/munged --pid-file=/run/munge/munged.pid </dev/null >/dev/null 2>&1
    wait_for munged sh -c 'munge -n | unmunge'
    say "munged up"
}

start_mariadb() {
    mkdir -p /var/lib/mysql /run/mysqld /var/log/mysql
    chown -R mysql:mysql /var/lib/mysql /run/mysqld /var/log/mysql
    if ! alive /run/mysqld/mariadbd.pid mariadbd; then
        if [[ ! -d /var/lib/mysql/mysql ]]; then
            mariadb-install-db --user=mysql --datadir=/var/lib/mysql --skip-test-db >"$STATE/log/mariadb-install.log" 2>&1
        fi
        setsid mariadbd --user=mysql --datadir=/var/lib/mysql --socket=/run/mysqld/mysqld.sock \
            --pid-file=/run/mysqld/mariadbd.pid --skip-networking --log-error=/var/log/mysql/speft-slurm.err \
            </dev/null >/dev/null 2>&1 &
        wait_for mariadbd mariadb-admin --socket=/run/mysqld/mysqld.sock ping
        wait_for "mariadbd's PID file" test -s /run/mysqld/mariadbd.pid
        say "mariadbd up"
    fi
    mariadb --socket=/run/mysqld/mysqld.sock -e "
        CREATE DATABASE IF NOT EXISTS slurm_acct_db;
        CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$DB_PASS';
        ALTER USER 'slurm'@'localhost' IDENTIFIED BY '$DB_PASS';
        GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';"
}

start_slurmdbd() {
    if ! alive "$STATE/run/slurmdbd.pid" slurmdbd; then
        slurmdbd </dev/null >/dev/null 2>&1
        wait_for slurmdbd sacctmgr -n -P list cluster
        say "slurmdbd up"
    fi
    if [[ -z "$(sacctmgr -n -P list cluster format=cluster where cluster=speft)" ]]; then
        sacctmgr -i -Q add cluster speft >/dev/null
    fi
}

start_slurmctld() {
    if alive "$STATE/run/slurmctld.pid" slurmctld; then
        ((CHANGED)) || return 0
        stop "$STATE/run/slurmctld.pid" slurmctld  # the node's CPUs or memory changed: restart
    fi
    slurmctld </dev/null >/dev/null 2>&1
    wait_for slurmctld sh -c 'scontrol ping | grep -q UP'
    say "slurmctld up"
}

node_usable() {
    local state
    state="$(sinfo -h -N -n localhost -o %T 2>/dev/null | head -1)"
    [[ "$state" =~ ^(idle|mixed|allocated)$ ]]
}

start_slurmd() {
    if alive "$STATE/run/slurmd.pid" slurmd; then
        if ((CHANGED)); then stop "$STATE/run/slurmd.pid" slurmd; fi
    fi
    if ! alive "$STATE/run/slurmd.pid" slurmd; then
        slurmd -N localhost </dev/null >/dev/null 2>&1
    fi
    # also when slurmd ran already: a restarted slurmctld knows the node once slurmd registers again
    wait_for "the node (sinfo: idle; see sinfo -R)" node_usable
    say "slurmd up: $(sinfo -h -N -n localhost -o '%N %T %c CPUs %m MB')"
}

# --- commands --------------------------------------------------------------------------------------

up() {
    [[ "$(id -u)" == 0 ]] || die "needs root (apt-get, daemons, /etc/slurm)"
    install_packages
    local start=$SECONDS
    write_configs
    start_munge
    start_mariadb
    start_slurmdbd
    start_slurmctld
    start_slurmd
    say "up in $((SECONDS - start)) s; partition 'local': $(sinfo -h -o '%P %a %D nodes %T')"
}

status() {
    local ok=0 f
    for f in /run/munge/munged.pid:munged /run/mysqld/mariadbd.pid:mariadbd "$STATE/run/slurmdbd.pid:slurmdbd" \
             "$STATE/run/slurmctld.pid:slurmctld" "$STATE/run/slurmd.pid:slurmd"; do
        if alive "${f%%:*}" "${f##*:}"; then echo "${f##*:}: running ($(cat "${f%%:*}"))"
        else echo "${f##*:}: stopped"; ok=1; fi
    done
    if command -v sinfo >/dev/null && node_usable; then sinfo; else echo "no usable node"; ok=1; fi
    return $ok
}

down() {
    if alive "$STATE/run/slurmctld.pid" slurmctld; then
        local jobs i
        jobs="$(squeue -h -o %A 2>/dev/null | sort -u | tr '\n' ' ')"
        if [[ -n "${jobs// }" ]]; then
            say "cancelling jobs $jobs"
            # shellcheck disable=SC2086
            scancel $jobs 2>/dev/null || true
            for i in $(seq 100); do [[ -z "$(squeue -h -t R,CG 2>/dev/null)" ]] && break; sleep 0.2; done
        fi
    fi
    stop "$STATE/run/slurmd.pid" slurmd
    stop "$STATE/run/slurmctld.pid" slurmctld
    stop "$STATE/run/slurmdbd.pid" slurmdbd
    stop /run/mysqld/mariadbd.pid mariadbd
    stop /run/munge/munged.pid munged
    local f
    for f in "$ETC/slurm.conf" "$ETC/slurmdbd.conf"; do
        if [[ -e "$f" ]] && ours "$f"; then rm -f "$f"; fi
    done
    # The controller's state stays: job ids go on from where they were, never repeating one that
    # the accounting database (kept in /var/lib/mysql) already knows.
    rm -rf "$STATE/spool" "$STATE/run"
    say "down"
}

case "${1:-}" in
    up) up ;;
    down) down ;;
    status) status ;;
    *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
