"""Schemas, checklists and code tables: data shipped as package data."""
