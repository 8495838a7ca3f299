#!/bin/sh
# Least-privilege RabbitMQ users for heartbeat-consumer (run on the broker host, as a
# user allowed to run rabbitmqctl).
#
#   permissions.sh AGENT            a user that can consume only agent.AGENT.inbox and
#                                   publish only heartbeat.AGENT.* (its results and status)
#   permissions.sh --ticker [USER]  a user that can declare the exchanges and publish
#                                   only system.heartbeat.* (ticks); USER defaults to
#                                   heartbeat-ticker
#   permissions.sh --monitor [USER] a user that can consume only the monitor's queue
#                                   (MONITOR_QUEUE, default heartbeat.monitor), bind it
#                                   only to heartbeat.# and publish only alerts
#                                   (heartbeat.*._alert.*); USER defaults to heartbeat-monitor
#
# Prints the lines for the service's environment file (/etc/heartbeat-consumer/AGENT.env).
# Agents run with DECLARE_EXCHANGES=false, so the exchanges must exist: start the ticker
# (or any admin-run component) once first.
#
# Environment: EXCHANGE_NAME (bloodbank.events.v1), VHOST (/), RABBIT_HOST (localhost),
# RABBIT_PORT (5672), PASSWORD (default: 48 random hex digits), RABBITMQCTL (rabbitmqctl),
# MONITOR_QUEUE (heartbeat.monitor).
set -eu

EXCHANGE_NAME=${EXCHANGE_NAME:-bloodbank.events.v1}
VHOST=${VHOST:-/}
RABBIT_HOST=${RABBIT_HOST:-localhost}
RABBIT_PORT=${RABBIT_PORT:-5672}
RABBITMQCTL=${RABBITMQCTL:-rabbitmqctl}

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

# A regex matching the exchange name literally (it usually contains dots).
EX=$(printf '%s' "$EXCHANGE_NAME" | sed 's/[].[^$*+?(){}|\\]/\\&/g')
DLX="$EX\\.dlx"
DLQ_WRITE=""  # the one routing key this user may dead-letter under, on the DLX

[ $# -ge 1 ] || usage
if [ "$1" = "--ticker" ]; then
    USER_NAME=${2:-heartbeat-ticker}
    name_ok "$USER_NAME" || { echo "$0: bad user name '$USER_NAME'" >&2; exit 2; }
    CONFIGURE="^($EX|$DLX)\$"
    WRITE="^$EX\$"
    READ='^$'
    TOPIC_WRITE='^system\.heartbeat\.'
    TOPIC_READ='^$'
elif [ "$1" = "--monitor" ]; then
    USER_NAME=${2:-heartbeat-monitor}
    name_ok "$USER_NAME" || { echo "$0: bad user name '$USER_NAME'" >&2; exit 2; }
    MONITOR_QUEUE=${MONITOR_QUEUE:-heartbeat.monitor}
    printf '%s' "$MONITOR_QUEUE" | grep -Eq '^[A-Za-z0-9][A-Za-z0-9._-]{0,200}$' || {
        echo "$0: bad queue name '$MONITOR_QUEUE'" >&2; exit 2; }
    MQ=$(printf '%s' "$MONITOR_QUEUE" | sed 's/[.]/\\./g')
    QUEUES="$MQ(\\.dlq)?"
    CONFIGURE="^$QUEUES\$"
    WRITE="^($QUEUES|$EX|$DLX)\$"
    READ="^($QUEUES|$EX|$DLX)\$"
    TOPIC_WRITE='^heartbeat\.[^.]+\._alert\.'
    TOPIC_READ='^heartbeat\.#$'
    DLQ_WRITE="^$MQ\\.dlq\$"
else
    [ $# -eq 1 ] || usage
    AGENT=$1
    name_ok "$AGENT" || {
        echo "$0: agent names are letters, digits, '_' and '-' (got '$AGENT')" >&2
        exit 2
    }
    USER_NAME="heartbeat-agent-$AGENT"
    QUEUES="agent\\.$AGENT\\.(inbox|dlq)"
    # configure: declare (and delete) only its own two queues.
    # write: bind its queues, publish to the exchange, dead-letter to the DLX.
    # read: consume its queues, bind from the two exchanges.
    CONFIGURE="^$QUEUES\$"
    WRITE="^($QUEUES|$EX|$DLX)\$"
    READ="^($QUEUES|$EX|$DLX)\$"
    # Topic permissions: publish only its own results and status events; bind only its
    # own keys and the ticks.
    TOPIC_WRITE="^heartbeat\\.$AGENT\\."
    TOPIC_READ="^(agent\\.$AGENT\\.#|system\\.heartbeat\\.#)\$"
    DLQ_WRITE="^agent\\.$AGENT\\.dlq\$"
fi

PASSWORD=${PASSWORD:-$(od -An -tx1 -N24 /dev/urandom | tr -d ' \n')}
if ctl list_users | awk '{print $1}' | grep -Fxq "$USER_NAME"; then
    printf '%s\n' "$PASSWORD" | ctl change_password "$USER_NAME" >/dev/null
else
    printf '%s\n' "$PASSWORD" | ctl add_user "$USER_NAME" >/dev/null
fi
ctl set_permissions -p "$VHOST" "$USER_NAME" "$CONFIGURE" "$WRITE" "$READ" >/dev/null
ctl set_topic_permissions -p "$VHOST" "$USER_NAME" "$EXCHANGE_NAME" "$TOPIC_WRITE" "$TOPIC_READ" >/dev/null
if [ -n "$DLQ_WRITE" ]; then
    ctl set_topic_permissions -p "$VHOST" "$USER_NAME" "$EXCHANGE_NAME.dlx" \
        "$DLQ_WRITE" "$DLQ_WRITE" >/dev/null
fi

case $VHOST in
    /) VHOST_PATH=/ ;;
    *) VHOST_PATH=/$(printf '%s' "$VHOST" | sed 's,/,%2F,g') ;;
esac
echo "RABBIT_URL=amqp://$USER_NAME:$PASSWORD@$RABBIT_HOST:$RABBIT_PORT$VHOST_PATH"
echo "EXCHANGE_NAME=$EXCHANGE_NAME"
[ -z "$DLQ_WRITE" ] || echo "DECLARE_EXCHANGES=false"
