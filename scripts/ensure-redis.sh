#!/usr/bin/env bash
# Make sure a Redis server answers on localhost: start one, installing redis-server with apt if absent.
set -euo pipefail
host=127.0.0.1
port=${REDIS_PORT:-6379}

answers() {
  # PING over bash's /dev/tcp, so no redis-cli is needed.
  (
    exec 3<>"/dev/tcp/$host/$port" || exit 1
    printf 'PING\r\n' >&3
    IFS= read -r -t 2 reply <&3 || exit 1
    [[ $reply == +PONG* ]]
  ) 2>/dev/null
}

if answers; then
  echo "redis: answering on $host:$port"
  exit 0
fi
if ! command -v redis-server >/dev/null 2>&1; then
  echo "redis: installing redis-server with apt"
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq redis-server >/dev/null
fi
redis-server --daemonize yes --bind "$host" --port "$port" --save "" --appendonly no \
  --dir /tmp --logfile "/tmp/redis-$port.log"
for _ in $(seq 100); do
  if answers; then
    echo "redis: started on $host:$port"
    exit 0
  fi
  sleep 0.1
done
echo "redis: did not start on $host:$port (see /tmp/redis-$port.log)" >&2
exit 1
