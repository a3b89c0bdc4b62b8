"""Shipped rules, templates and the example config; installed as `router.shipped`."""
