#!/bin/sh
# Least-privilege RabbitMQ users for heartbeat-consumer, and the queues they use (run on
# the broker host, as a user allowed to run rabbitmqctl).
#
#   permissions.sh AGENT            a user that can consume only agent.AGENT.inbox and
#                                   publish only heartbeat.AGENT.* (its results and status)
#   permissions.sh --ticker [USER]  a user that can publish only system.heartbeat.* (ticks);
#                                   USER defaults to heartbeat-ticker
#   permissions.sh --monitor [USER] a user that can consume only the monitor's queue
#                                   (MONITOR_QUEUE, default heartbeat.monitor) and publish
#                                   only alerts (heartbeat.*._alert.*); USER defaults to
#                                   heartbeat-monitor
#
# None of these users may declare, delete or re-declare anything (no configure
# permission): a user that could re-declare its own queue could aim its dead letters
# anywhere, since the broker re-publishes dead letters without checking permissions.
# So this script provisions what the user needs, as an admin would: the exchanges, and
# the agent's inbox and dead-letter queue (or the monitor's queues) with their arguments
# and bindings. It does so with `heartbeat-consumer provision` run as a temporary user
# that may declare exactly those, deleted afterwards.
#
# Prints the lines for the service's environment file (/etc/heartbeat-consumer/AGENT.env).
#
# Environment: EXCHANGE_NAME (bloodbank.events.v1), VHOST (/), RABBIT_HOST (localhost),
# RABBIT_PORT (5672), PASSWORD (default: 48 random hex digits), RABBITMQCTL (rabbitmqctl),
# MONITOR_QUEUE (heartbeat.monitor), HEARTBEAT_CONSUMER (the heartbeat-consumer command;
# default: the one on PATH, else /opt/heartbeat-consumer/.venv/bin/heartbeat-consumer),
# QUEUE_TYPE (classic or quorum) and SINGLE_ACTIVE_CONSUMER (true) for an agent's inbox,
# REPLICAS (names, space-separated: the agent runs --standby on each host, each with
# HEARTBEAT_REPLICA set to one of them; their state queues agent.AGENT.state.NAME are
# provisioned, and the user may read them and publish state events),
# DLQ_MAX_LENGTH (10000) and DLQ_TTL (7d) for dead-letter queues, PROVISION=no to create
# the user only (then run `heartbeat-consumer provision` yourself, as an admin),
# MAX_CONNECTIONS (8) and MAX_CHANNELS (64): the user's limits on the broker.
#
# Running it again for an existing user resets it: new password, no tags, these
# permissions and topic permissions in VHOST only. Connections open with the old
# password stay open: restart the service after rotating a password.
set -eu
set -f  # word lists (REPLICAS) are split on spaces, never expanded as globs

EXCHANGE_NAME=${EXCHANGE_NAME:-bloodbank.events.v1}
VHOST=${VHOST:-/}
RABBIT_HOST=${RABBIT_HOST:-localhost}
RABBIT_PORT=${RABBIT_PORT:-5672}
RABBITMQCTL=${RABBITMQCTL:-rabbitmqctl}
PROVISION=${PROVISION:-yes}
MAX_CONNECTIONS=${MAX_CONNECTIONS:-8}
MAX_CHANNELS=${MAX_CHANNELS:-64}
case "$MAX_CONNECTIONS$MAX_CHANNELS" in
    *[!0-9]*|"") echo "$0: MAX_CONNECTIONS and MAX_CHANNELS are numbers" >&2; exit 2 ;;
esac

usage() {
    echo "usage: $0 AGENT | --ticker [USER] | --monitor [USER]" >&2
    exit 2
}

name_ok() {  # the agent-name rule of heartbeat.v1 (also keeps regexes free of metacharacters)
    printf '%s' "$1" | grep -Eq '^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$'
}

ctl() {
    "$RABBITMQCTL" -q "$@"
}

random_password() {
    od -An -tx1 -N24 /dev/urandom | tr -d ' \n'
}

# A regex matching the exchange name literally (it usually contains dots).
EX=$(printf '%s' "$EXCHANGE_NAME" | sed 's/[].[^$*+?(){}|\\]/\\&/g')
DLX="$EX\\.dlx"
DLQ_WRITE=""  # the one routing key this user may dead-letter under, on the DLX

[ $# -ge 1 ] || usage
if [ "$1" = "--ticker" ]; then
    USER_NAME=${2:-heartbeat-ticker}
    name_ok "$USER_NAME" || { echo "$0: bad user name '$USER_NAME'" >&2; exit 2; }
    WRITE="^$EX\$"
    READ='^$'
    TOPIC_WRITE='^system\.heartbeat\.[^.]+$'
    PROVISIONS="^($EX|$DLX)\$"
    set -- --exchanges
elif [ "$1" = "--monitor" ]; then
    USER_NAME=${2:-heartbeat-monitor}
    name_ok "$USER_NAME" || { echo "$0: bad user name '$USER_NAME'" >&2; exit 2; }
    MONITOR_QUEUE=${MONITOR_QUEUE:-heartbeat.monitor}
    printf '%s' "$MONITOR_QUEUE" | grep -Eq '^[A-Za-z0-9][A-Za-z0-9._-]{0,200}$' || {
        echo "$0: bad queue name '$MONITOR_QUEUE'" >&2; exit 2; }
    MQ=$(printf '%s' "$MONITOR_QUEUE" | sed 's/[.]/\\./g')
    # write: publish alerts, dead-letter to its DLQ; read: consume its queue.
    WRITE="^($EX|$DLX)\$"
    READ="^$MQ\$"
    TOPIC_WRITE='^heartbeat\.[A-Za-z0-9][A-Za-z0-9_-]*\._alert\.[^.]+$'
    DLQ_WRITE="^$MQ\\.dlq\$"
    PROVISIONS="^($EX|$DLX|$MQ|$MQ\\.dlq)\$"
    set -- --monitor "$MONITOR_QUEUE"
else
    [ $# -eq 1 ] || usage
    AGENT=$1
    name_ok "$AGENT" || {
        echo "$0: agent names are letters, digits, '_' and '-' (got '$AGENT')" >&2
        exit 2
    }
    USER_NAME="heartbeat-agent-$AGENT"
    STATE_QUEUES=""  # agent.AGENT.state.NAME for each replica, as a regex alternation
    for replica in ${REPLICAS:-}; do
        name_ok "$replica" || { echo "$0: bad replica name '$replica'" >&2; exit 2; }
        STATE_QUEUES="${STATE_QUEUES:+$STATE_QUEUES|}state\\.$replica"
    done
    # write: publish to the exchange, dead-letter to the DLX; read: consume its inbox
    # (and, for replicas, their state queues).
    WRITE="^($EX|$DLX)\$"
    READ="^agent\\.$AGENT\\.(inbox${STATE_QUEUES:+|$STATE_QUEUES})\$"
    # Topic permissions: publish only its own results, run announcements and status
    # events and answers: heartbeat.AGENT.<check>.<word>, heartbeat.AGENT._status.<word>
    # and heartbeat.AGENT._command.<ack|error>, never
    # heartbeat.AGENT._alert.* (alerts are the monitor's word).
    TOPIC_WRITE="^heartbeat\\.$AGENT\\.([A-Za-z0-9][A-Za-z0-9_-]*|_status|_command)\\.[^.]+\$"
    if [ -n "$STATE_QUEUES" ]; then  # replicas: their state events too
        TOPIC_WRITE="^heartbeat\\.$AGENT\\.([A-Za-z0-9][A-Za-z0-9_-]*|_status|_command|_state)\\.[^.]+\$"
    fi
    DLQ_WRITE="^agent\\.$AGENT\\.dlq\$"
    PROVISIONS="^($EX|$DLX|agent\\.$AGENT\\.(inbox|dlq${STATE_QUEUES:+|$STATE_QUEUES}))\$"
    set -- --agent "$AGENT"
    for replica in ${REPLICAS:-}; do set -- "$@" --replica "$replica"; done
    [ -z "${QUEUE_TYPE:-}" ] || set -- "$@" --queue-type "$QUEUE_TYPE"
    case ${SINGLE_ACTIVE_CONSUMER:-} in
        1|true|yes|on) set -- "$@" --single-active-consumer ;;
    esac
fi

printf '%s' "$VHOST" | grep -Eq '^[A-Za-z0-9._~/-]{1,255}$' || {
    echo "$0: VHOST names here are letters, digits and . _ ~ / - (got '$VHOST')" >&2
    exit 2
}
case $VHOST in
    /) VHOST_PATH=/ ;;
    *) VHOST_PATH=/$(printf '%s' "$VHOST" | sed 's,/,%2F,g') ;;
esac

if [ "$PROVISION" != "no" ]; then
    if [ -z "${HEARTBEAT_CONSUMER:-}" ]; then
        HEARTBEAT_CONSUMER=$(command -v heartbeat-consumer || true)
        [ -n "$HEARTBEAT_CONSUMER" ] || HEARTBEAT_CONSUMER=/opt/heartbeat-consumer/.venv/bin/heartbeat-consumer
    fi
    [ -x "$HEARTBEAT_CONSUMER" ] || command -v "$HEARTBEAT_CONSUMER" >/dev/null 2>&1 || {
        echo "$0: heartbeat-consumer not found (set HEARTBEAT_CONSUMER to it, or PROVISION=no" \
            "and run 'heartbeat-consumer provision $*' as an admin)" >&2
        exit 1
    }
    # A temporary user that may declare exactly what this component needs.
    PROVISIONER="heartbeat-provision-$(random_password | cut -c1-12)"
    PROVISIONER_PASSWORD=$(random_password)
    # Deleted however this ends: normally, on an error, or on a signal (dash runs no
    # EXIT trap when a signal kills it, so the signals get their own).
    trap 'ctl delete_user "$PROVISIONER" >/dev/null 2>&1 || true' EXIT
    trap 'exit 129' HUP
    trap 'exit 130' INT
    trap 'exit 143' TERM
    printf '%s\n' "$PROVISIONER_PASSWORD" | ctl add_user "$PROVISIONER" >/dev/null
    ctl set_permissions -p "$VHOST" "$PROVISIONER" "$PROVISIONS" "$PROVISIONS" "$PROVISIONS" >/dev/null
    RABBIT_URL="amqp://$PROVISIONER:$PROVISIONER_PASSWORD@$RABBIT_HOST:$RABBIT_PORT$VHOST_PATH" \
        "$HEARTBEAT_CONSUMER" --log-level WARNING provision "$@" --exchange "$EXCHANGE_NAME" >&2
    ctl delete_user "$PROVISIONER" >/dev/null
    trap - EXIT HUP INT TERM
fi

PASSWORD=${PASSWORD:-$(random_password)}
if ctl list_users --no-table-headers | awk '{print $1}' | grep -Fxq "$USER_NAME"; then
    printf '%s\n' "$PASSWORD" | ctl change_password "$USER_NAME" >/dev/null
    ctl clear_topic_permissions -p "$VHOST" "$USER_NAME" >/dev/null 2>&1 || true
else
    printf '%s\n' "$PASSWORD" | ctl add_user "$USER_NAME" >/dev/null
fi
ctl set_user_tags "$USER_NAME" >/dev/null  # none: no management or admin rights
ctl set_user_limits "$USER_NAME" \
    "{\"max-connections\": $MAX_CONNECTIONS, \"max-channels\": $MAX_CHANNELS}" >/dev/null
# configure '^$': declares, deletes and re-declarations are all refused.
ctl set_permissions -p "$VHOST" "$USER_NAME" '^$' "$WRITE" "$READ" >/dev/null
ctl set_topic_permissions -p "$VHOST" "$USER_NAME" "$EXCHANGE_NAME" "$TOPIC_WRITE" '^$' >/dev/null
if [ -n "$DLQ_WRITE" ]; then
    ctl set_topic_permissions -p "$VHOST" "$USER_NAME" "$EXCHANGE_NAME.dlx" \
        "$DLQ_WRITE" '^$' >/dev/null
fi

echo "RABBIT_URL=amqp://$USER_NAME:$PASSWORD@$RABBIT_HOST:$RABBIT_PORT$VHOST_PATH"
echo "EXCHANGE_NAME=$EXCHANGE_NAME"
echo "DECLARE=false"
if [ -n "${STATE_QUEUES:-}" ]; then
    echo "STANDBY=true"
    echo "QUEUE_TYPE=${QUEUE_TYPE:-classic}"
    echo "# and on each host its own: HEARTBEAT_REPLICA=<one of: $REPLICAS>"
fi
