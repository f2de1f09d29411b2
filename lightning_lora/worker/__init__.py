"""The RabbitMQ queue runner: job messages, the consumer, the publisher CLI."""
