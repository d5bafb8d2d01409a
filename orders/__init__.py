"""orders: the order microservice of the checkout."""
