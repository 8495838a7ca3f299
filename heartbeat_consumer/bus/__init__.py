"""RabbitMQ: connections and TLS, topology and provisioning, the agent consumer, the
fleet, the ticker, requests that wait for their answer, and the AsyncAPI document."""
