#!/usr/bin/env bash
# A real single-node Slurm cluster on this machine, for testing the sbatch scripts in slurm/.
#
#   bash tools/slurm_local.sh up     [STATE_DIR]   # start it (installs Slurm and munge first if missing); idempotent
#   bash tools/slurm_local.sh status [STATE_DIR]   # daemons, node state, queue
#   bash tools/slurm_local.sh down   [STATE_DIR]   # cancel its jobs, stop the daemons it started
#   export SLURM_CONF=STATE_DIR/slurm.conf         # `up` prints this line; then sbatch/srun/squeue/scontrol work
#
# STATE_DIR defaults to ${TMPDIR:-/tmp}/topd-slurm-$UID. Every directory above it must be searchable by all users
# (munged refuses a socket below a directory that is not, and runs as the unprivileged `munge` user).
#
# Needs: root (apt-get, the munge user, slurmd starting jobs), Debian/Ubuntu with the slurm-wlm packages in its
# archive (`slurmctld`, `slurmd`, `slurm-client`, `munge`; tested with Slurm 22.05 and munge 0.5.15). Nothing else on
# the machine is reconfigured: the packages' own services and /etc/slurm, /etc/munge are not used (where the package
# manager starts services on install, those are left as they are); the only system file this script may change is
# /etc/hosts, when this machine's hostname does not resolve (it adds "127.0.0.1 HOSTNAME").
#
# What `up` does:
#   1. installs the packages with apt-get when slurmctld/slurmd/sbatch/munged are missing;
#   2. starts a private munged (own key, 0400 owned by munge; socket directory 0711) under STATE_DIR/munge;
#   3. writes STATE_DIR/slurm.conf and gres.conf: one node (this host, CPUs and memory as `slurmd -C` reports them)
#      reachable at 127.0.0.1 only, declaring 8 fake GPUs (character devices like /dev/null made with mknod under
#      STATE_DIR/dev), so that `#SBATCH --gpus-per-node=8` is accepted; EnforcePartLimits=ALL so that impossible
#      requests fail at submission instead of pending forever; a small MinJobAge so that `sbatch --wait` polls fast;
#      finished jobs are recorded in STATE_DIR/jobcomp.txt (JobId, JobState, ExitCode, ...);
#   4. starts slurmctld and slurmd with `-f STATE_DIR/slurm.conf` (state, spool, logs and PID files under STATE_DIR),
#      waits until the node is idle, and prints `export SLURM_CONF=...`.
# `down` cancels every job of this cluster, then stops slurmd, slurmctld and munged by the PID files `up` wrote (a
# PID is only signalled when its process still runs the expected program). Logs stay in STATE_DIR.
set -euo pipefail

cmd="${1:-}"
if [[ "$cmd" != up && "$cmd" != down && "$cmd" != status ]]; then
    sed -n '2,7p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
fi
state="$(realpath -m "${2:-${TMPDIR:-/tmp}/topd-slurm-$(id -u)}")"
conf="$state/slurm.conf"
munge_dir="$state/munge"
munge_socket="$munge_dir/run/munge.socket.2"
node="$(hostname -s)"

log() { echo "[slurm_local] $*" >&2; }
die() { echo "[slurm_local] error: $*" >&2; exit 1; }

# ---- helpers: PID files --------------------------------------------------------------------------------------------

# pid_alive PIDFILE PROGRAM: true when the PID in PIDFILE runs PROGRAM (guards against a reused PID).
pid_alive() {
    local pidfile="$1" prog="$2" pid
    pid="$(tr -dc '0-9' 2>/dev/null <"$pidfile")" || return 1
    [[ -n "$pid" && -r "/proc/$pid/comm" ]] || return 1
    [[ "$(cat "/proc/$pid/comm" 2>/dev/null)" == "$prog"* ]] || return 1
    local stat
    stat="$(cat "/proc/$pid/stat" 2>/dev/null)" || return 1
    [[ "${stat##*) }" != Z* ]]  # an exited process not yet reaped by its parent counts as stopped
}

# stop_pidfile PIDFILE PROGRAM: SIGTERM the process of PIDFILE (if it is PROGRAM), wait up to 15 s, then SIGKILL.
stop_pidfile() {
    local pidfile="$1" prog="$2" pid i
    if pid_alive "$pidfile" "$prog" && pid="$(tr -dc '0-9' 2>/dev/null <"$pidfile")"; then
        log "stopping $prog (pid $pid)"
        kill -TERM "$pid" 2>/dev/null || true
        for ((i = 0; i < 150; i++)); do
            pid_alive "$pidfile" "$prog" || break
            sleep 0.1
        done
        if pid_alive "$pidfile" "$prog"; then
            log "$prog (pid $pid) ignored SIGTERM; sending SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
        fi
    fi
    rm -f "$pidfile"
}

# ---- helpers: pieces of `up` ---------------------------------------------------------------------------------------

# Install slurmctld/slurmd/the clients/munge when any of them is missing (needs root and a package archive).
ensure_packages() {
    local missing=()
    for bin in slurmctld slurmd sbatch munged; do
        command -v "$bin" >/dev/null 2>&1 || PATH="$PATH:/usr/sbin:/sbin" command -v "$bin" >/dev/null 2>&1 \
            || missing+=("$bin")
    done
    [[ ${#missing[@]} -eq 0 ]] && return
    [[ "$(id -u)" -eq 0 ]] || die "Slurm is not installed (missing: ${missing[*]}) and installing it needs root"
    command -v apt-get >/dev/null 2>&1 || die "Slurm is not installed (missing: ${missing[*]}) and apt-get is absent"
    log "installing slurmctld slurmd slurm-client munge with apt-get (missing: ${missing[*]})"
    local apt=(apt-get -y -q --no-install-recommends -o DPkg::Lock::Timeout=300)
    # Try the package lists as they are first; refresh them only if that fails (a fresh container has none).
    if ! DEBIAN_FRONTEND=noninteractive "${apt[@]}" install slurmctld slurmd slurm-client munge; then
        DEBIAN_FRONTEND=noninteractive apt-get -q -o DPkg::Lock::Timeout=300 update
        DEBIAN_FRONTEND=noninteractive "${apt[@]}" install slurmctld slurmd slurm-client munge
    fi
}

# The node's hostname must resolve (slurmctld/slurmd look themselves up by name).
ensure_hostname() {
    getent hosts "$node" >/dev/null && return
    [[ "$(id -u)" -eq 0 ]] || die "hostname $node does not resolve; add '127.0.0.1 $node' to /etc/hosts"
    log "hostname $node does not resolve: adding '127.0.0.1 $node' to /etc/hosts"
    echo "127.0.0.1 $node" >>/etc/hosts
}

# Every directory above STATE_DIR must be searchable by others, or munged (as user munge) cannot reach its files.
check_reachable() {
    local d="$state"
    while [[ "$d" != "/" ]]; do
        d="$(dirname "$d")"
        [[ "$(( 0$(stat -c %a "$d") & 1 ))" -eq 1 ]] \
            || die "$d (above $state) is not searchable by other users (mode $(stat -c %a "$d")); munged needs every" \
                "directory above its socket to be. Use a STATE_DIR such as \${TMPDIR:-/tmp}/topd-slurm-\$UID"
    done
}

# A private munged: its own key, socket, log, PID and seed files under STATE_DIR/munge, running as user munge.
start_munge() {
    if pid_alive "$munge_dir/run/munged.pid" munged; then
        return
    fi
    id munge >/dev/null 2>&1 || die "user munge does not exist (is the munge package installed?)"
    mkdir -p "$munge_dir/run"
    chmod 0755 "$state"
    chmod 0711 "$munge_dir"
    chmod 0711 "$munge_dir/run"  # clients need to reach the socket, not list the directory
    if [[ ! -s "$munge_dir/munge.key" ]]; then
        dd if=/dev/urandom of="$munge_dir/munge.key" bs=1024 count=1 status=none
    fi
    chmod 0400 "$munge_dir/munge.key"
    chown -R munge:munge "$munge_dir"
    rm -f "$munge_socket" "$munge_socket.lock"
    runuser -u munge -- "$(command -v munged || echo /usr/sbin/munged)" \
        --key-file="$munge_dir/munge.key" --socket="$munge_socket" --pid-file="$munge_dir/run/munged.pid" \
        --log-file="$munge_dir/munged.log" --seed-file="$munge_dir/munged.seed"
    munge -n -S "$munge_socket" | unmunge -S "$munge_socket" >/dev/null \
        || die "munged does not answer on $munge_socket (see $munge_dir/munged.log)"
}

# free_port FIRST: the first TCP port from FIRST up that nothing listens on at 127.0.0.1, so that two clusters on one
# machine get their own ports (Slurm's defaults are 6817 and 6818).
free_port() {
    local port
    for ((port = $1; port < $1 + 200; port++)); do
        if ! (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            echo "$port"
            return
        fi
    done
    echo "[slurm_local] error: no free TCP port in $1-$(($1 + 199))" >&2
    return 1
}

# slurm.conf, gres.conf and the fake GPU devices.
write_config() {
    local hw cpus boards sockets cores threads mem ctld_port slurmd_port
    hw="$(slurmd -C | head -1)"
    field() { sed -n "s/.*\b$1=\([0-9]*\).*/\1/p" <<<"$hw"; }
    cpus="$(field CPUs)" boards="$(field Boards)" sockets="$(field SocketsPerBoard)"
    cores="$(field CoresPerSocket)" threads="$(field ThreadsPerCore)" mem="$(field RealMemory)"
    mem=$((mem * 9 / 10))  # below what slurmd measures, or the node is drained for "low RealMemory"
    ctld_port="$(free_port 6817)"
    slurmd_port="$(free_port $((ctld_port + 1)))"
    mkdir -p "$state/dev" "$state/ctld" "$state/spool" "$state/log"
    for i in 0 1 2 3 4 5 6 7; do
        # character devices with the numbers of /dev/null: Slurm needs device files for GRES, nothing opens them
        [[ -c "$state/dev/nvidia$i" ]] || mknod -m 0666 "$state/dev/nvidia$i" c 1 3
    done
    cat >"$state/gres.conf" <<EOF
# Fake GPUs (see tools/slurm_local.sh): they let GPU directives through; nothing uses them.
AutoDetect=off
NodeName=$node Name=gpu File=$state/dev/nvidia[0-7]
EOF
    cat >"$conf" <<EOF
# A single-node test cluster written by tools/slurm_local.sh; everything it keeps is under $state.
ClusterName=topd-local
SlurmctldHost=$node(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
CommunicationParameters=NoCtldInAddrAny,NoInAddrAny
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$munge_socket
StateSaveLocation=$state/ctld
SlurmdSpoolDir=$state/spool
SlurmctldPidFile=$state/slurmctld.pid
SlurmdPidFile=$state/slurmd.pid
SlurmctldLogFile=$state/log/slurmctld.log
SlurmdLogFile=$state/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
GresTypes=gpu
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/filetxt
JobCompLoc=$state/jobcomp.txt
EnforcePartLimits=ALL
MinJobAge=4
ReturnToService=2
SlurmdTimeout=60
KillWait=10
NodeName=$node NodeHostname=$node NodeAddr=127.0.0.1 CPUs=$cpus Boards=$boards SocketsPerBoard=$sockets CoresPerSocket=$cores ThreadsPerCore=$threads RealMemory=$mem Gres=gpu:8 State=UNKNOWN
PartitionName=local Nodes=$node Default=YES MaxTime=INFINITE State=UP
EOF
}

# Wait until the node is idle (slurmd registered with slurmctld); resume it if an earlier run left it down/drained.
wait_idle() {
    local i st=""
    for ((i = 0; i < 120; i++)); do
        st="$(SLURM_CONF="$conf" sinfo -h -N -n "$node" -o %t 2>/dev/null | head -1 || true)"
        case "$st" in
            idle | mix | alloc) return ;;
            down* | drain* | drng*)
                SLURM_CONF="$conf" scontrol update nodename="$node" state=resume 2>/dev/null || true
                ;;
        esac
        sleep 0.5
    done
    die "node $node not idle after 60 s (state '${st:-no answer}'); see $state/log/slurmctld.log and slurmd.log"
}

# ---- commands ------------------------------------------------------------------------------------------------------

up() {
    export PATH="$PATH:/usr/sbin:/sbin"
    mkdir -p "$state"
    ensure_packages
    [[ "$(id -u)" -eq 0 ]] || die "starting munged as user munge and slurmd needs root"
    ensure_hostname
    check_reachable
    # Already up (e.g. `up` run twice): leave it as it is.
    if pid_alive "$state/slurmctld.pid" slurmctld && pid_alive "$state/slurmd.pid" slurmd \
        && pid_alive "$munge_dir/run/munged.pid" munged; then
        log "already running in $state"
    else
        # Partly up (a daemon died): stop what is left, then start all of it on a fresh config.
        stop_pidfile "$state/slurmd.pid" slurmd
        stop_pidfile "$state/slurmctld.pid" slurmctld
        start_munge
        write_config
        slurmctld -f "$conf"
        slurmd -f "$conf"
        wait_idle
        log "up: node $node idle; state, logs and PID files in $state"
    fi
    echo "export SLURM_CONF=$conf"
}

down() {
    export PATH="$PATH:/usr/sbin:/sbin"
    # Cancel the jobs first (their steps are stopped by slurmd), then wait a little for them to leave the queue.
    if pid_alive "$state/slurmctld.pid" slurmctld; then
        local jobs i
        jobs="$(SLURM_CONF="$conf" squeue -h -o %i 2>/dev/null || true)"
        if [[ -n "$jobs" ]]; then
            log "cancelling jobs: $(echo $jobs)"
            # shellcheck disable=SC2086
            SLURM_CONF="$conf" scancel $jobs 2>/dev/null || true
            for ((i = 0; i < 60; i++)); do
                [[ -z "$(SLURM_CONF="$conf" squeue -h -o %i 2>/dev/null || true)" ]] && break
                sleep 0.5
            done
        fi
    fi
    stop_pidfile "$state/slurmd.pid" slurmd
    stop_pidfile "$state/slurmctld.pid" slurmctld
    stop_pidfile "$munge_dir/run/munged.pid" munged
    log "down ($state)"
}

status() {
    export PATH="$PATH:/usr/sbin:/sbin"
    local name pidfile rc=0
    for name in munged slurmctld slurmd; do
        case "$name" in
            munged) pidfile="$munge_dir/run/munged.pid" ;;
            *) pidfile="$state/$name.pid" ;;
        esac
        if pid_alive "$pidfile" "$name"; then
            echo "$name: running (pid $(tr -dc '0-9' 2>/dev/null <"$pidfile"))"
        else
            echo "$name: not running"
            rc=1
        fi
    done
    if [[ $rc -eq 0 ]]; then
        SLURM_CONF="$conf" sinfo -N -o "%N %t %c %G" || rc=1
        SLURM_CONF="$conf" squeue || rc=1
        echo "export SLURM_CONF=$conf"
    fi
    return $rc
}

"$cmd"
