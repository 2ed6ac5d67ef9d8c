"""An example workflow package for durable; its tasks live in durable_example.workflows."""
