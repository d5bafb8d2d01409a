"""The use cases, by aggregate (orders.py, products.py), and their unit of work."""
