#!/usr/bin/env bash
# Make sure a Redis server answers where the service will look for it:
#   SUPIR_REDIS_URL (redis://[user:password@]host[:port][/db], rediss:// too) when set, else 127.0.0.1:$REDIS_PORT
#   (default 6379).
# A server that does not answer is started (redis-server installed with apt if absent) only when the address is
# this machine (localhost, a loopback address, or one of this machine's own names or addresses); for another
# machine this fails, saying so. With SUPIR_REDIS_SENTINELS set the URL's host is not used: nothing is checked.
set -euo pipefail

if [ -n "${SUPIR_REDIS_SENTINELS:-}" ]; then
  echo "redis: SUPIR_REDIS_SENTINELS is set: the master is found through the Sentinels; not checked here"
  exit 0
fi

url=${SUPIR_REDIS_URL:-}
if [ -n "$url" ]; then
  case "$url" in
    redis://* | rediss://*) ;;
    *)
      echo "redis: SUPIR_REDIS_URL=$url: only redis:// and rediss:// URLs can be checked here" >&2
      exit 2
      ;;
  esac
  rest=${url#*://}
  rest=${rest%%/*}   # drop /db and anything after
  rest=${rest%%\?*}  # drop a query
  hostport=${rest##*@}  # drop user:password@
  password=${SUPIR_REDIS_PASSWORD:-}
  if [[ $rest == *@* ]]; then
    userinfo=${rest%@*}
    [[ $userinfo == *:* ]] && password=${userinfo#*:}
  fi
  if [[ $hostport == \[* ]]; then  # [IPv6]:port
    host=${hostport#\[}
    host=${host%%\]*}
    after=${hostport#*\]}
    port=${after#:}
  elif [[ $hostport == *:* ]]; then
    host=${hostport%%:*}
    port=${hostport##*:}
  else
    host=$hostport
    port=""
  fi
  host=${host:-127.0.0.1}
  port=${port:-6379}
  where="SUPIR_REDIS_URL"
else
  host=127.0.0.1
  port=${REDIS_PORT:-6379}
  password=""
  where="REDIS_PORT"
fi
if ! [[ $port =~ ^[0-9]+$ ]]; then
  echo "redis: $where gives port '$port', not a number" >&2
  exit 2
fi

answers() {
  # PING over bash's /dev/tcp, so no redis-cli is needed; at most 3 s (an unreachable host must not hang this).
  # A server that wants a password answers NOAUTH: it answers (the service sends the password). TLS (rediss://)
  # cannot be spoken here: an open connection is enough.
  local tls=no
  [[ $url == rediss://* ]] && tls=yes
  timeout 3 bash -c '
    exec 3<>"/dev/tcp/$1/$2" || exit 1
    [ "$3" = yes ] && exit 0
    printf "PING\r\n" >&3
    IFS= read -r -t 2 reply <&3 || exit 1
    [[ $reply == +PONG* || $reply == -NOAUTH* || $reply == -WRONGPASS* ]]
  ' _ "$host" "$port" "$tls" 2>/dev/null
}

this_machine() {
  case "$host" in
    localhost | 127.* | ::1 | 0.0.0.0 | "$(hostname)" | "$(hostname -f 2>/dev/null || hostname)") return 0 ;;
  esac
  # one of this machine's own addresses
  local addresses
  addresses=" $(hostname -I 2>/dev/null || true) "
  [[ $addresses == *" $host "* ]]
}

if answers; then
  echo "redis: answering on $host:$port"
  exit 0
fi
if ! this_machine; then
  echo "redis: nothing answers on $host:$port ($where), which is not this machine, so no server is started" \
    "here: start that server, or unset SUPIR_REDIS_URL to use one on this machine" >&2
  exit 1
fi
if ! command -v redis-server >/dev/null 2>&1; then
  echo "redis: installing redis-server with apt"
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq redis-server >/dev/null
fi
case "$host" in
  localhost | 0.0.0.0) bind=127.0.0.1 ;;
  *) bind=$host ;;
esac
# a URL with a password gets a server that asks for it (given on stdin, so it is not on the command line)
{ [ -z "$password" ] || printf 'requirepass "%s"\n' "$password"; } |
  redis-server - --daemonize yes --bind "$bind" --port "$port" --save "" --appendonly no --maxmemory-policy noeviction \
    --dir /tmp --logfile "/tmp/redis-$port.log"
for _ in $(seq 100); do
  if answers; then
    echo "redis: started on $bind:$port"
    exit 0
  fi
  sleep 0.1
done
echo "redis: did not start on $bind:$port (see /tmp/redis-$port.log)" >&2
exit 1
