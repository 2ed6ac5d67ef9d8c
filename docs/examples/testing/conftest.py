pytest_plugins = ["durable.testing"]
