"""Providers: one adapter per upstream kind (HTTP) plus pure translation modules."""
