#!/bin/sh
# ssh-compatible remote shell for the fake hosts of tests/netns.py: runs the command on the named host by
# entering its network namespace and giving it its hostname. No sshd, no keys.
#
#   nsrsh.sh [ssh options] [user@]host command...       (the command is run by `sh -c`, as ssh does)
#
# ACCO_NETNS_HOSTS (from FakeHosts.rsh_env()) maps each host name and address to "namespace:hostname":
#   ACCO_NETNS_HOSTS="node0=acco12-0-h0:node0 10.231.0.1=acco12-0-h0:node0 node1=..."
# Use it as Open MPI's agent (mpirun --mca plm_rsh_agent tests/nsrsh.sh; DeepSpeed:
# --launcher_args="--mca plm_rsh_agent $PWD/tests/nsrsh.sh"), or link it as `ssh` first on PATH for pdsh.
# The command inherits this process's environment (unlike real ssh).
set -eu

while [ $# -gt 0 ]; do
  case "$1" in
    --) shift; break ;;
    -[BbcDEeFIiJLlmOoPpQRSWw]) shift 2 ;;            # an option and its separate argument (-o Key=value)
    -[BbcDEeFIiJLlmOoPpQRSWw]*) shift ;;             # an option with its argument attached (-oKey=value)
    -*) shift ;;                                     # flags (-x -T -n -q ...)
    *) break ;;
  esac
done
[ $# -ge 1 ] || { echo "nsrsh: no host given" >&2; exit 255; }
host=${1#*@}
shift
[ $# -ge 1 ] || { echo "nsrsh: no command given for $host (interactive logins are not supported)" >&2; exit 255; }

target=""
for entry in ${ACCO_NETNS_HOSTS:-}; do
  if [ "${entry%%=*}" = "$host" ]; then target=${entry#*=}; fi
done
[ -n "$target" ] || { echo "nsrsh: unknown host '$host' (ACCO_NETNS_HOSTS='${ACCO_NETNS_HOSTS:-}')" >&2; exit 255; }

exec ip netns exec "${target%%:*}" unshare --uts sh -c 'hostname "$0" && exec sh -c "$1"' "${target#*:}" "$*"
